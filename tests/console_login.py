"""What the console tests share: logging in through the real form (the login nonce, the
token), reading a page's CSRF token, and the headers every console answer carries."""

from __future__ import annotations

import re

import httpx

from servo.console.app import SECURITY_HEADERS

HEADERS = {name.decode(): value.decode() for name, value in SECURITY_HEADERS}
_FIELD = re.compile(r'name="(?P<name>[a-z]+)" value="(?P<value>[^"]*)"')


def field(html: str, name: str) -> str:
    """The value of the first hidden field `name` of a page."""
    for found in _FIELD.finditer(html):
        if found["name"] == name:
            return found["value"]
    raise AssertionError(f"no field {name!r} in the page")


class Clients:
    """The test's HTTP clients of one console, closed together at its end."""

    def __init__(self, url: str):
        self.url = url
        self.opened: list[httpx.Client] = []

    def anonymous(self) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=10)
        self.opened.append(client)
        return client

    def login(self, token: str) -> httpx.Client:
        """A client logged in with `token` (it keeps the session cookie)."""
        return login(self.anonymous(), token)

    def close(self) -> None:
        for client in self.opened:
            client.close()


def login(client: httpx.Client, token: str) -> httpx.Client:
    """`client` logged in to the console with `token` through the real form."""
    form = client.get("/console/login")
    assert form.status_code == 200, form.text
    answer = client.post(
        "/console/login", data={"token": token, "nonce": field(form.text, "nonce")}
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/console/models"
    return client


def csrf(client: httpx.Client, path: str = "/console/models") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    return field(page.text, "csrf")


def secured(response: httpx.Response) -> None:
    """`response` carries every security header of the console."""
    for name, value in HEADERS.items():
        assert response.headers.get(name) == value, (response.url, name, response.headers)
