"""The tree's own rules: every side table covers every row of embed_core/table.py, settings are read per service,
and the tests that start a server carry the `serve` marker."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embed_core.errors import ModelLoadError
from embed_core.table import KINDS, POOLING_NAMES, SERVICES

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def test_every_service_has_a_tiny_checkpoint_for_the_http_tests():
    from tests.conftest import SERVICE_MODEL_FIXTURES

    assert set(SERVICE_MODEL_FIXTURES) == set(SERVICES)


def test_the_robustness_suite_has_endpoints_for_every_kind():
    from tests.test_robustness_http import KIND_ENDPOINTS, SERVED

    assert set(KIND_ENDPOINTS) == set(KINDS)
    assert set(SERVED) == set(SERVICES)


def test_compose_places_every_service_on_a_gpu():
    from deploy.generate import COMPOSE_GPU

    assert set(COMPOSE_GPU) == set(SERVICES)


def test_service_py_has_one_module_level_class_per_row_and_a_base_per_kind():
    import bentoml

    import service

    assert set(service.KIND_BASES) == set(KINDS)
    served = {name for name, value in vars(service).items() if isinstance(value, bentoml.Service)}
    assert served == {spec.class_name for spec in SERVICES.values()}
    for spec in SERVICES.values():
        assert getattr(service, spec.class_name).name == spec.seed_name


def test_every_pooling_name_has_a_rule_and_every_default_is_one():
    from runners.pooling import POOLINGS

    assert set(POOLINGS) == set(POOLING_NAMES)
    assert {spec.default_pooling for spec in SERVICES.values()} - {None} <= set(POOLING_NAMES)


def test_a_malformed_setting_stops_only_its_own_service(bge_dir, monkeypatch):
    """service.py reads no service's settings at import; each service's start-up check reads its own alone."""
    import service

    monkeypatch.setenv("SIGLIP2_EMBED_MAX_IMAGE_BYTES", "lots")
    monkeypatch.setenv("BGE_EMBED_MODEL", str(bge_dir))
    service.check_start_up(SERVICES["bge_embed"])  # not SigLIP2's business
    with pytest.raises(ModelLoadError, match="SIGLIP2_EMBED_MAX_IMAGE_BYTES"):
        service.check_start_up(SERVICES["siglip2_embed"])
    monkeypatch.setenv("BGE_EMBED_MAX_REQUEST_MB", "1.5")
    with pytest.raises(ModelLoadError, match="BGE_EMBED_MAX_REQUEST_MB"):
        service.check_start_up(SERVICES["bge_embed"])


def test_importing_service_py_patches_nothing_until_a_worker_starts_serving():
    """Importing service.py (bentoml build, the tests, a linter) leaves the process as it was; start_serving(),
    which a worker runs as it starts (EmbedService.to_asgi), makes the server-wide settings."""
    script = """
import os, sys
from uvicorn import config
from uvicorn.server import Server
from bentoml._internal.server.http import traffic
before = (sys.getswitchinterval(), config.HTTP_PROTOCOLS["auto"], Server.shutdown, traffic.TimeoutMiddleware,
          os.environ.get("OMP_WAIT_POLICY"))
import service
after = (sys.getswitchinterval(), config.HTTP_PROTOCOLS["auto"], Server.shutdown, traffic.TimeoutMiddleware,
         os.environ.get("OMP_WAIT_POLICY"))
assert after == before, (before, after)
service.start_serving()
assert sys.getswitchinterval() == 0.0005 and config.HTTP_PROTOCOLS["auto"].endswith("ClientDeadlineProtocol")
assert traffic.TimeoutMiddleware is not before[3] and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
print("ok")
"""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_each_protocol_is_one_adapter_and_the_http_layer_alone_knows_statuses():
    """Every wire protocol is an adapter module registered once; runners/ and embed_core/ carry no HTTP status."""
    from embed_http.adapter import Adapter
    from embed_http.registry import PROTOCOLS
    from embed_http.seed import SEED

    assert all(isinstance(protocol, Adapter) for protocol in (SEED, *PROTOCOLS))
    assert len({protocol.name for protocol in (SEED, *PROTOCOLS)}) == len(PROTOCOLS) + 1
    for folder in ("runners", "embed_core"):
        for path in (REPO / folder).glob("*.py"):
            source = path.read_text()
            assert "status=" not in source and "starlette" not in source, path


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("embed_core", {"runners", "embed_http", "embed_ops", "embed_client", "torch", "bentoml", "starlette"}),
        ("runners", {"embed_http", "embed_ops", "starlette", "bentoml"}),
        ("embed_ops", {"runners", "embed_http"}),
    ],
)
def test_the_layers_import_downwards_only(folder, forbidden):
    """embed_core is neutral (everyone imports it, it imports none of them); runners/ knows nothing of HTTP; the
    operator tools read the table and settings without the model code (no more runners.loading._HUB_IGNORE)."""
    for path in sorted((REPO / folder).glob("*.py")):
        assert not imported_packages(path) & forbidden, path


def test_numbers_from_the_environment_are_read_by_one_helper():
    from embed_core.config import SettingError, env_number

    assert env_number(None, "X", 7, parse=int) == 7 and env_number(" ", "X", 7, parse=int) == 7
    assert env_number("2.5", "X", 1.0, parse=float, above=0.0) == 2.5
    for raw, bounds, message in [
        ("lots", {}, "X must be an integer, got 'lots'"),
        ("0", {"minimum": 1}, "X must be >= 1, got 0"),
        ("1.5", {}, "X must be an integer"),
    ]:
        with pytest.raises(SettingError, match=message):
            env_number(raw, "X", 1, parse=int, **bounds)
    with pytest.raises(SettingError, match="X must be a number > 0"):
        env_number("0", "X", 1.0, parse=float, above=0.0)


# -- the `serve` marker -------------------------------------------------------------------------------

# What starts a real server: the conftest helpers, or `bentoml serve` run directly.
STARTS_A_SERVER = re.compile(r'\b(serve|serve_tiny)\(|"bentoml", "serve"')


def marked_serve(decorators: list[ast.expr]) -> bool:
    return any(ast.unparse(decorator) == "pytest.mark.serve" for decorator in decorators)


def module_marked_serve(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", "") == "pytestmark" for target in node.targets):
            return "pytest.mark.serve" in ast.unparse(node.value)
    return False


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda path: path.name)
def test_every_test_that_starts_a_server_is_marked_serve(path):
    tree = ast.parse(path.read_text())
    if module_marked_serve(tree):
        return
    # Fixtures of this module that start a server, then the tests that call one or use such a fixture.
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    serving = {node.name for node in functions if STARTS_A_SERVER.search(ast.unparse(node))}
    unmarked = [
        node.name
        for node in functions
        if node.name.startswith("test_")
        and (node.name in serving or {arg.arg for arg in node.args.args} & serving)
        and not marked_serve(node.decorator_list)
    ]
    assert not unmarked, f"{path.name}: these start a server but are not marked serve: {unmarked}"
