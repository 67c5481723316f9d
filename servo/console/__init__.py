"""The ops console: server-rendered pages under `/console` on the admin port (see
`servo.console.app`)."""
