"""services/vllm/*.yaml are `vllm serve --config` files: the pinned vLLM's own argument parser reads each of
them (in .venv-vllm, where vLLM lives), and refuses a misspelt flag, so the check has teeth."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from services.vllm import launch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "services" / "vllm").glob("*.yaml"))

PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = make_arg_parser(FlexibleArgumentParser())
out = {}
for path in sys.argv[1:]:
    a = parser.parse_args(["--config", path])
    out[path] = {"model": a.model, "served_model_name": a.served_model_name, "port": a.port,
                 "enable_lora": a.enable_lora, "max_loras": a.max_loras, "max_lora_rank": a.max_lora_rank}
print("RESULT " + json.dumps(out))
"""


def parse(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    if not launch.VLLM_PYTHON.is_file():
        pytest.skip("vLLM is not installed (make vllm)")
    return subprocess.run(
        [str(launch.VLLM_PYTHON), "-c", PARSE, *map(str, paths)], capture_output=True, text=True, timeout=180, cwd=ROOT
    )


def test_every_launch_file_is_accepted_by_the_pinned_vllm() -> None:
    assert {p.name for p in CONFIGS} >= {"t0.yaml", "t1.yaml", "t2.yaml", "cpu.yaml"}
    r = parse(CONFIGS)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    parsed = json.loads(line.removeprefix("RESULT "))
    for path in CONFIGS:
        want = yaml.safe_load(path.read_text())
        got = parsed[str(path)]
        assert got["model"] == want["model"] and got["served_model_name"] == [want["served-model-name"]]
        assert got["port"] == want["port"] and got["enable_lora"] is True
        assert (got["max_loras"], got["max_lora_rank"]) == (want["max-loras"], want["max-lora-rank"])


def test_a_misspelt_flag_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "services/vllm/t0.yaml").read_text() + "max-lora-rnak: 64\n")
    r = parse([bad])
    assert r.returncode != 0 and "unrecognized arguments: --max-lora-rnak" in r.stderr
