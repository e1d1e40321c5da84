"""The command line as a whole: every option documented, every command with an example, shared options alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from komt_edge.cli import cli

from .conftest import run_cli


def _commands(group: click.Group, prefix: str = "komt-edge"):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def test_every_option_has_help_and_every_command_an_example():
    missing = [f"{path} {p.opts[0]}" for path, cmd in _commands(cli) for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert not missing, f"options without help: {missing}"
    no_example = [path for path, cmd in _commands(cli) if "Example" not in (cmd.help or "")]
    assert not no_example, f"commands without an example: {no_example}"


def test_shared_options_have_one_syntax_everywhere():
    """A flag letter or name means one thing: -r is --repetitions, -t is an integer thread count, -q/--quants
    is the output types, --json takes an optional file, --template offers auto/llama/mistral."""
    seen: dict[str, tuple[str, str]] = {}
    for path, cmd in _commands(cli):
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            for opt in p.opts + p.secondary_opts:
                kind = (p.name, type(p.type).__name__)
                if opt in ("-h", "--help"):
                    continue
                if opt in seen and seen[opt][0] != kind[0]:
                    raise AssertionError(f"{opt} is {seen[opt]} in one command and {kind} in {path}")
                seen.setdefault(opt, kind)
    assert seen["-t"] == ("n_threads", "IntRange")
    assert seen["-r"][0] == "repetitions"
    assert seen["--quants"][0] == seen["-q"][0] == "quants"
    templates = {tuple(p.type.choices) for _, cmd in _commands(cli) for p in cmd.params if p.name == "template"}
    assert all(t[:3] == ("auto", "llama", "mistral") for t in templates), templates


# --- starting the CLI: no stage module, no torch -------------------------------------------------------------

# What `komt-edge --help` must not pay for: each of these takes from 0.1 s (numpy) to 2 s (torch) to import here.
HEAVY = ("torch", "transformers", "llama_cpp", "huggingface_hub", "numpy", "gguf", "safetensors", "peft", "fastapi",
         "uvicorn", "matplotlib")


def _heavy_loaded(code: str) -> list[str]:
    """The HEAVY top-level modules a fresh interpreter holds after running ``code`` (its exit included)."""
    probe = ("import atexit, json, sys\n"
             f"atexit.register(lambda: print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & "
             f"set({HEAVY!r}))), file=sys.stderr))\n" + code)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_the_probe_sees_a_heavy_import():
    assert _heavy_loaded("import komt_edge.cli, numpy") == ["numpy"]


def test_importing_the_cli_imports_no_heavy_library():
    """Every command module imports its stage inside the command, so starting komt-edge costs click alone."""
    assert _heavy_loaded("import komt_edge.cli") == []


@pytest.mark.parametrize("argv", [["--help"], ["gguf", "--help"], ["release", "--help"], ["models"],
                                  ["models", "--json"]])
def test_help_and_models_run_without_torch(argv):
    """`komt-edge --help`, a command's help and `komt-edge models` answer without torch, transformers or llama.cpp
    (`models` asks huggingface_hub's cache which adapter configs it holds: that library, and only it, is loaded)."""
    run = f"import sys\nsys.argv = ['komt-edge', *{argv!r}]\nfrom komt_edge.cli import main\nmain()\n"
    allowed = {"huggingface_hub"} if argv[0] == "models" else set()
    assert set(_heavy_loaded(run)) <= allowed


def test_stage_defaults_written_in_the_cli_are_the_stages():
    """Decorators run at start, so the CLI writes the gguf and release default types out; they must agree."""
    from komt_edge.cli.gguf import gguf_cmd
    from komt_edge.cli.hub import release_cmd
    from komt_edge.gguf import DEFAULT_QUANTS
    from komt_edge.release import DEFAULT_RELEASE_QUANTS

    def default(cmd):
        return tuple(next(p for p in cmd.params if p.name == "quants").default)

    assert default(gguf_cmd) == DEFAULT_QUANTS
    assert default(release_cmd) == DEFAULT_RELEASE_QUANTS


# --- one meaning per shared option ---------------------------------------------------------------------------

def test_threads_means_the_cpu_threads_a_command_computes_on_everywhere():
    helps = {path: p.help for path, cmd in _commands(cli) for p in cmd.params if "-t" in getattr(p, "opts", ())}
    computing = {path for path, cmd in _commands(cli)} - {"komt-edge models", "komt-edge push"}
    assert set(helps) == computing, computing - set(helps)
    assert all(h.startswith("CPU threads the command computes on") for h in helps.values()), helps


def test_every_command_with_a_result_takes_json():
    """Every command that returns a result (with ``to_dict()``) writes it with --json [FILE]; chat and serve run
    until stopped and return none."""
    without = sorted(path for path, cmd in _commands(cli) if "json_out" not in {p.name for p in cmd.params})
    assert without == ["komt-edge chat", "komt-edge serve"]


def test_json_alone_prints_only_the_json(tiny_mistral, tmp_path, monkeypatch, capsys):
    """`--json` without a FILE: standard output is the JSON and nothing else; with a FILE, the summary prints and
    the file holds the same JSON."""
    args = ["gguf", str(tiny_mistral), "-q", "q8_0", "--name", "komt-tiny", "-t", "1", "-o", str(tmp_path)]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--json")
    assert code == 0, err
    path = tmp_path / "komt-tiny-Q8_0.gguf"
    assert json.loads(out) == {"files": [str(path)]} and path.is_file()
    code, out, err = run_cli(monkeypatch, capsys, *args, "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert out.splitlines() == [str(path)]
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"files": [str(path)]}


def test_gguf_architectures_agree_in_code_help_and_readme():
    from komt_edge.cli.gguf import gguf_cmd
    from komt_edge.converters.hf_to_gguf import ARCHITECTURES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### `komt-edge gguf MODEL")[1].split("\n### ")[0]
    bullet = section.split("\n- Architectures:")[1].split("\n- ")[0]
    for arch in ARCHITECTURES:
        assert arch in gguf_cmd.help, f"{arch}: name it in `komt-edge gguf --help` (komt_edge/cli/gguf.py)"
        assert f"`{arch}`" in bullet, f"{arch}: name it in README's `komt-edge gguf` Architectures bullet"


def test_every_command_quiets_the_libraries_through_its_verbose_option():
    """Nothing else calls configure_output on the way to a command: -v/--verbose's callback does, for each
    (`models`, which drives no library, only with -v)."""
    missing = [path for path, cmd in _commands(cli) if "verbose" not in {p.name for p in cmd.params}]
    assert not missing, missing


def test_models_reads_no_download_machinery_for_adapters_never_downloaded(tmp_path):
    """With no adapter in huggingface_hub's cache, `komt-edge models` says "not downloaded yet" without importing
    huggingface_hub's download module (a third of a second); a cached adapter is read through it
    (tests/test_zoo_download.py)."""
    code = ("import sys\nsys.argv = ['komt-edge', 'models']\nfrom komt_edge.cli import cli\n"
            "cli.main(standalone_mode=False)\nprint('file_download' in str(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    from komt_edge.zoo import ZOO

    assert proc.stdout.count("not downloaded yet") == sum(1 for m in ZOO if m.adapter)
    assert proc.stdout.splitlines()[-1] == "False"


@pytest.mark.parametrize("argv", [["merge", "BASE", "ADAPTER", "-o", "OUT", "-t", "1"],
                                  ["verify", "F.gguf", "--hf", "M", "-t", "1"],
                                  ["bench", "speed", "F.gguf", "-t", "1"],
                                  ["train", "--model", "M", "--data", "D", "-o", "O", "-t", "1"]])
def test_threads_caps_torch_too(argv):
    """-t N, parsed in a fresh komt-edge, caps the threads of torch imported afterwards (verify's Hugging Face
    reference, gguf's converter, merge): not only llama.cpp's. (torch never uses more than the cores: 1 it is.)"""
    code = ("import click\nfrom komt_edge.cli import cli\n"
            f"cmd, args = cli, {argv!r}\n"
            "while isinstance(cmd, click.Group):\n    cmd = cmd.commands[args.pop(0)]\n"
            "cmd.make_context(cmd.name, args)\n"
            "import torch\nprint(torch.get_num_threads())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1"]


def test_merge_takes_the_shared_threads_and_json(tiny_mistral, mistral_adapter, tmp_path, monkeypatch, capsys):
    """merge's -t is the shared option (torch threads for its arithmetic) and its --json names the merged folder."""
    out = tmp_path / "merged"
    code, stdout, err = run_cli(monkeypatch, capsys, "merge", str(tiny_mistral), str(mistral_adapter), "-o", str(out),
                                "-t", "1", "--json")
    assert code == 0, err
    assert json.loads(stdout) == {"out": str(out)} and (out / "config.json").is_file()
