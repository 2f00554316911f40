"""Report fixtures: the metering ones (a real Redis, a pricing file, a metered gateway)."""

from tests.metering.conftest import metered, pricing_file, redis_server, redis_url  # noqa: F401
