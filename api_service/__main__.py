"""``python -m api_service``: the gateway under uvicorn on CYBERSEC_API_HOST:CYBERSEC_API_PORT."""

from __future__ import annotations

import uvicorn

from api_service.app import create_app
from shared.logging import configure_logging
from shared.settings import load_settings


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level, "api", settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # uvicorn's loggers propagate to the root handler configured above
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.shutdown_timeout,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


if __name__ == "__main__":
    main()
