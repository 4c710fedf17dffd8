"""``python -m api_service``: the gateway under uvicorn on CYBERSEC_API_HOST:CYBERSEC_API_PORT."""

from __future__ import annotations

import uvicorn

from api_service.app import create_app
from shared.settings import load_settings


def main() -> None:
    settings = load_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.shutdown_timeout,
        proxy_headers=True,
    )


if __name__ == "__main__":
    main()
