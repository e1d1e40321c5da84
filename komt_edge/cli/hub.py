"""`komt-edge push` and `komt-edge release`: the Hub (``komt_edge.push``, ``komt_edge.release``)."""

from __future__ import annotations

from pathlib import Path

import click

from . import options
from .common import progress_log, show

# komt_edge.release.DEFAULT_RELEASE_QUANTS, written out so that starting komt-edge imports no stage (nor torch);
# tests/test_cli.py checks that the two agree.
RELEASE_QUANTS = ("q4_0", "q4_K_M", "q5_K_M", "q8_0")


@click.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True, help="Hub model repo ORG/NAME; created when missing.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (created from main when missing).")
@click.option("--dry-run", is_flag=True, help="List what would be created and uploaded; send nothing.")
@options.force("Publish into a repo holding files komt-edge did not make (kept).")
@click.option("-m", "--message", default=None, help="Commit message.")
@options.json_out()
@options.verbose()
def push_cmd(folder: Path, repo_id: str, private: bool, revision: str | None, dry_run: bool, force: bool,
             message: str | None, json_out: Path | None) -> None:
    """Upload FOLDER to a Hub repo, resumably: files the Hub already has are not sent again.

    The token comes from HF_TOKEN or `hf auth login`, nowhere else. Example:
    komt-edge push dist/release/komt-mistral-7b-v1/komt-mistral-7b-v1-GGUF --repo my-org/komt-mistral-7b-v1-GGUF
    """
    from ..push import push

    result = push(folder, repo_id, private=private, revision=revision, dry_run=dry_run, force=force,
                  commit_message=message, log=progress_log(json_out))
    show(result.summary(), result.to_dict(), json_out)


@click.command("release")
@click.argument("model")
@click.option("--org", required=True, help="Hub user or organization that gets the repos.")
@options.quants(RELEASE_QUANTS, "GGUF type")
@click.option("--gptq/--no-gptq", default=True, show_default=True,
              help="Also build and publish the GPTQ repo (when the GPTQ stage is installed).")
@click.option("--bench/--no-bench", default=True, show_default=True,
              help="Measure Korean perplexity, KL vs f16 and tokens/s for the cards (when installed).")
@click.option("--dry-run", is_flag=True, help="Show the stages, repos and uploads; do nothing.")
@options.out_dir(None, "Output folder, reused by re-runs  [default: dist/release/NAME].")
@options.adapter()
@options.template()
@options.name("Release name, for files and repos (default: the model's).")
@click.option("--base-model", default=None, help="Hub id the cards name as base_model (for a local MODEL).")
@click.option("--license", "license_", default=None, help="Licence id for the cards (default: the model's).")
@click.option("--gguf-repo", default=None, help="GGUF repo id  [default: ORG/NAME-GGUF].")
@click.option("--gptq-repo", default=None, help="GPTQ repo id  [default: ORG/NAME-GPTQ].")
@click.option("--private", is_flag=True, help="Create the repos private.")
@options.force("Release into repos, or an -o folder, holding files komt-edge did not make (they are kept).")
@click.option("--push/--no-push", default=True, show_default=True, help="Publish (--no-push: build and card only).")
@click.option("--keep-merged", is_flag=True, help="Also write the merged full-precision checkpoint to OUT/merged.")
@click.option("--imatrix", default="korean", show_default=True, metavar="korean|FILE|none",
              help="Importance matrix for the k-quant and IQ types (published in the GGUF repo): the Korean one "
                   "komt-edge computes, an imatrix file, or none.")
@click.option("--lora/--no-lora", default=None,
              help="Also publish the adapter as llama.cpp's LoRA GGUF (<name>-LoRA-F16.gguf) in the GGUF repo, "
                   "for use on a GGUF of the base  [default: on when the model has an adapter].")
@options.threads()
@options.json_out()
@options.allow_pickle()
@options.verbose()
def release_cmd(model: str, org: str, quants: tuple[str, ...], gptq: bool, bench: bool, dry_run: bool,
                out: Path | None, adapter: str | None, template: str | None, name: str | None,
                base_model: str | None, license_: str | None, gguf_repo: str | None, gptq_repo: str | None,
                private: bool, force: bool, push: bool, keep_merged: bool, imatrix: str, lora: bool | None,
                n_threads: int | None, json_out: Path | None, allow_pickle: bool) -> None:
    """Build, verify, benchmark and publish MODEL's GGUF and GPTQ repos with model cards.

    Stages merge → gguf → gptq → verify → lora → bench → card → push, recorded in OUT/release-manifest.json: a re-run
    skips finished stages and resumes after a crash, a network failure or Ctrl-C. Nothing is pushed unless every
    file passed verification. Example: komt-edge release komt-mistral-7b --org my-org --quants "q4_0 q8_0"
    """
    from ..release import release

    result = release(model, org, quants=quants, gptq=gptq, bench=bench, dry_run=dry_run, out=out, adapter=adapter,
                     template=template, name=name, base_model=base_model, license=license_, gguf_repo=gguf_repo,
                     gptq_repo=gptq_repo, private=private, force=force, push=push, keep_merged=keep_merged,
                     imatrix=imatrix, lora=lora, allow_pickle=allow_pickle, n_threads=n_threads,
                     log=progress_log(json_out))
    show(result.summary(), result.to_dict(), json_out)
