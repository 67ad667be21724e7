"""Shared fixtures for the integration tests.

Fixtures:
    fake_upstream_module  module-scoped running FakeUpstream
    fake_upstream         the same server, cleared (requests, errors, knobs) for each test
    mitm_confdir          session-scoped mitmproxy confdir (CA generated once, reused)
    start_proxy           factory: start_proxy(script=DEFAULT_SCRIPT, *, extra_args=(), env=None,
                          **options) -> running MitmProxy; every option becomes --set key=value.
                          All proxies are stopped at test teardown.  ``mitm`` is an alias.
    start_proxy_module    the same factory, proxies live until the end of the module
    plain_proxy           module-scoped plain mitmdump (script=None), no addon

Helpers (import from ``proxyproc`` / ``fake_upstream``, or from here):
    proxied_client(proxy)        httpx.Client through the proxy (timeout 10 s, trust_env=False)
    masker_options(upstream)     {"masker_hosts": "127.0.0.1:<port>"}
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_upstream import FakeUpstream
from proxyproc import DEFAULT_SCRIPT, MitmProxy, proxied_async_client, proxied_client
from redisproc import RedisServer, redis_server_fixture

__all__ = ["cleared", "masker_options", "proxied_async_client", "proxied_client", "run"]

DEFAULT_TEST_TIMEOUT = 120  # seconds, applied when pytest-timeout is installed and no mark is given


def masker_options(upstream: FakeUpstream, **extra: Any) -> dict[str, Any]:
    """Options that make the addon mask traffic to ``upstream``."""
    return {"masker_hosts": upstream.host_port, **extra}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slow test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "mitm: test that starts a real mitmdump subprocess")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


def run[T](coro: Awaitable[T]) -> T:
    """Run a coroutine to completion from a synchronous test."""
    async def wrapped() -> T:
        return await coro

    return asyncio.run(wrapped())


# ---- redis-server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A real redis-server on a free port, shared by the tests of a module."""
    yield from redis_server_fixture()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop, kill or pause it or count connections."""
    yield from redis_server_fixture()


# ---- fake upstream --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_upstream_module() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def cleared(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """Fixture body: ``upstream`` cleared for one test, failing it if the upstream's handlers crashed."""
    upstream.clear()
    yield upstream
    errors = list(upstream.errors)
    upstream.clear()
    assert not errors, f"fake upstream handler errors: {errors!r}"


@pytest.fixture
def fake_upstream(fake_upstream_module: FakeUpstream) -> Iterator[FakeUpstream]:
    yield from cleared(fake_upstream_module)


# ---- mitmdump -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mitm_confdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mitm-confdir")


ProxyFactory = Callable[..., MitmProxy]


def _make_factory(default_confdir: Path, started: list[MitmProxy]) -> ProxyFactory:
    def start_proxy(script: str | Path | None = DEFAULT_SCRIPT, *, extra_args: tuple[str, ...] = (),
                    env: dict[str, str] | None = None, confdir: Path | None = None,
                    **options: Any) -> MitmProxy:
        proxy = MitmProxy(script, options, extra_args=extra_args, env=env, confdir=confdir or default_confdir)
        started.append(proxy)
        return proxy.start()

    return start_proxy


@pytest.fixture
def start_proxy(mitm_confdir: Path) -> Iterator[ProxyFactory]:
    started: list[MitmProxy] = []
    yield _make_factory(mitm_confdir, started)
    for proxy in reversed(started):
        proxy.close()


@pytest.fixture
def mitm(start_proxy: ProxyFactory) -> ProxyFactory:
    return start_proxy


@pytest.fixture(scope="module")
def start_proxy_module(mitm_confdir: Path) -> Iterator[ProxyFactory]:
    started: list[MitmProxy] = []
    yield _make_factory(mitm_confdir, started)
    for proxy in reversed(started):
        proxy.close()


@pytest.fixture(scope="module")
def plain_proxy(start_proxy_module: ProxyFactory) -> MitmProxy:
    return start_proxy_module(script=None)
