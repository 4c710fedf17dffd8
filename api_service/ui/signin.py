"""Sign-in with an API key, sign-out, and the guard every other page sits behind."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from api_service.errors import ApiError
from api_service.routes.common import db_unavailable, services
from api_service.ui.render import error_page, page
from api_service.ui.session import Session, SessionCookies, session_state, sign_out
from shared.retry import DATABASE_ERRORS as DB_ERRORS

LOGIN_PATH = "/ui/login"
HOME_PATH = "/ui/"

REASONS = {
    "revoked": "Your API key was revoked or is unknown: sign in with a valid key.",
    "signed_out": "You are signed out.",
    "expired": "Your session ended: sign in again.",
}


@dataclass(frozen=True, slots=True)
class SignedIn:
    session: Session
    key_id: UUID


Page = Callable[[Request, SignedIn], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def cookies(request: Request) -> SessionCookies:
    jar: SessionCookies = request.app.state.ui_cookies
    return jar


def redirect(request: Request, url: str) -> Response:
    """A 303 to ``url``; for an htmx request, the header that makes htmx load it as a page."""
    if request.headers.get("hx-request") == "true":
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


def to_login(request: Request, reason: str) -> Response:
    return redirect(request, f"{LOGIN_PATH}?reason={reason}")


def csrf_error() -> ApiError:
    return ApiError(
        403,
        "the form's security token is missing or out of date; reload the page and try again",
        code="csrf_failed",
    )


async def check_csrf(request: Request, session: Session) -> None:
    form = await request.form()
    token = form.get("csrf")
    if not isinstance(token, str) or not session.csrf_matches(token):
        raise csrf_error()


def signed_in(handler: Page) -> Endpoint:
    """Run ``handler`` for a live session of an active key; a POST must carry the CSRF token.

    An :class:`ApiError` from the API's handlers becomes an error page with the same status.
    """

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        jar = cookies(request)
        session = jar.load(request)
        if session is None or session.key_id is None:
            return to_login(request, "expired" if request.cookies else "signed_out")
        try:
            state = await session_state(services(request).store.pool, session)
        except DB_ERRORS:
            return error_page(request, db_unavailable(), session)
        if state != "live":
            response = to_login(request, state)
            jar.clear(request, response)
            return response
        try:
            if request.method == "POST":
                await check_csrf(request, session)
            return await handler(request, SignedIn(session, session.key_id))
        except ApiError as exc:
            if exc.status == 401:
                return to_login(request, "revoked")
            return error_page(request, exc, session)

    return endpoint


async def login_form(request: Request) -> Response:
    jar = cookies(request)
    session = jar.load(request)
    if session is not None and session.key_id is not None:
        return RedirectResponse(HOME_PATH, status_code=303)
    fresh = session is None
    session = session or Session.anonymous()
    reason = REASONS.get(request.query_params.get("reason", ""))
    response = page(
        request, "login.html", {"session": None, "csrf": session.csrf, "notice": reason}
    )
    if fresh:
        jar.store(request, response, session)
    return response


async def login(request: Request) -> Response:
    jar = cookies(request)
    session = jar.load(request)
    if session is None:
        # The form's token lives in the cookie set with the form: without it, start over.
        return to_login(request, "expired")
    try:
        await check_csrf(request, session)
        form = await request.form()
        key = form.get("api_key")
        key_id = None
        if isinstance(key, str) and key.strip():
            key_id = await services(request).auth.key_id(key.strip())
    except ApiError as exc:
        return error_page(request, exc)
    if key_id is None:
        context = {
            "session": None,
            "csrf": session.csrf,
            "error": "That API key is unknown or revoked. Create one with "
            "`cybersec keys create --name <name>` and paste it here.",
        }
        return page(request, "login.html", context, status_code=401)
    response = RedirectResponse(HOME_PATH, status_code=303)
    jar.store(request, response, session.signed_in(key_id))
    return response


@signed_in
async def logout(request: Request, user: SignedIn) -> Response:
    jar = cookies(request)
    try:
        await sign_out(services(request).store.pool, user.session, jar.max_age)
    except DB_ERRORS:
        return error_page(request, db_unavailable(), user.session)
    response = RedirectResponse(f"{LOGIN_PATH}?reason=signed_out", status_code=303)
    jar.clear(request, response)
    return response


routes = [
    Route("/login", login_form, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
