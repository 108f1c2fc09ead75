"""One wiring test: the stage names and command lines agree across the CLI, dvc.yaml, MLproject and KFP.

components/ and the orchestrator files know the CLI by name only; this is what holds them together.
The component command lines are read from the compiled IR (what a cluster runs), not from Python.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from mammoseg.cli import PIPELINE_STAGES, STAGES, build_parser
from mammoseg.config import STAGE_CONFIGS, overridable_fields, stage_config
from tests.conftest import REPO_ROOT

PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
PLACEHOLDER = re.compile(r"\{\{\$\.(inputs|outputs)\.artifacts\['(\w+)'\]\.path\}\}")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    from pipelines.settings import load_compile_inputs
    from pipelines.training import compile_pipeline

    path = compile_pipeline(tmp_path_factory.mktemp("ir") / "pipeline.yaml", load_compile_inputs())
    return next(yaml.safe_load_all(path.read_text()))


def _fill(arg: str) -> str:
    """Replace KFP placeholders by recognisable paths: /in/<artifact>, /out/<artifact>."""
    arg = PLACEHOLDER.sub(lambda m: f"/{'in' if m.group(1) == 'inputs' else 'out'}/{m.group(2)}", arg)
    return arg.replace("{{$.pipeline_job_uuid}}", "run-1")


def test_stage_names_agree_everywhere():
    from components import STAGE_COMPONENTS

    dvc_stages = tuple(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])
    entry_points = yaml.safe_load((REPO_ROOT / "MLproject").read_text())["entry_points"]
    assert dvc_stages == PIPELINE_STAGES
    assert tuple(STAGE_COMPONENTS) == PIPELINE_STAGES
    assert set(entry_points) - {"main"} == set(PIPELINE_STAGES)
    assert all(stage in STAGES and stage in PARAMS for stage in PIPELINE_STAGES)
    assert {name: c.component_spec.name for name, c in STAGE_COMPONENTS.items()} == {s: s for s in PIPELINE_STAGES}


@pytest.mark.parametrize("stage", PIPELINE_STAGES)
def test_component_command_line_parses_with_the_cli(stage, compiled, tmp_path):
    from components.common import STAGE_COMMAND

    container = compiled["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
    assert container["command"] == STAGE_COMMAND
    params_arg, *args = container["args"]
    assert params_arg == "{{$.inputs.parameters['params']}}"
    # What the prologue runs: mammoseg --params <the block, written to a file> <args>
    block = json.loads(compiled["root"]["inputDefinitions"]["parameters"][f"{stage}_params"]["defaultValue"])
    assert block == {stage: PARAMS[stage]}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(block))
    argv = ["--params", str(params_file), *map(_fill, args)]
    namespace = build_parser(block).parse_args(argv)
    assert namespace.command == stage

    # Every path flag is set, from the artifact of the same name: `--x-out` from output x, `--x` from input x.
    component = compiled["components"][f"comp-{stage}"]
    inputs = set(component["inputDefinitions"].get("artifacts", {}))
    outputs = set(component["outputDefinitions"]["artifacts"])
    used_inputs, used_outputs = set(), set()
    for path in STAGES[stage].paths:
        dest = path.flag.lstrip("-").replace("-", "_")
        value = str(getattr(namespace, dest))
        if dest.endswith("_out"):
            assert value.startswith(f"/out/{dest.removesuffix('_out')}"), (path.flag, value)
            used_outputs.add(dest.removesuffix("_out"))
        else:
            assert value.startswith(f"/in/{dest}"), (path.flag, value)
            used_inputs.add(dest)
    assert (used_inputs, used_outputs) == (inputs, outputs)

    # The block alone is a valid config for the stage, with the flags the component sets.
    overrides = {f.name: getattr(namespace, f.name) for f in overridable_fields(STAGE_CONFIGS[stage])}
    stage_config(stage, block, overrides)


def _parse(command: str):
    argv = shlex.split(command)
    assert argv[0] == "mammoseg", command
    return build_parser(PARAMS).parse_args(argv[1:])


@pytest.mark.parametrize("stage", PIPELINE_STAGES)
def test_dvc_command_parses_with_the_cli(stage):
    cmd = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    cmd = " ".join(cmd) if isinstance(cmd, list) else cmd

    def lookup(match: re.Match) -> str:
        block, key = match.group(1).split(".", 1)
        return str(PARAMS[block][key])

    namespace = _parse(re.sub(r"\$\{([^}]+)\}", lookup, cmd))
    assert namespace.command == stage
    assert all(getattr(namespace, p.flag.lstrip("-").replace("-", "_")) is not None
               for p in STAGES[stage].paths if p.required)


@pytest.mark.parametrize("stage", PIPELINE_STAGES)
def test_mlproject_command_parses_with_the_cli(stage):
    entry = yaml.safe_load((REPO_ROOT / "MLproject").read_text())["entry_points"][stage]
    defaults = {name: spec["default"] for name, spec in entry["parameters"].items()}
    assert _parse(entry["command"].format(**defaults)).command == stage
