"""Manual check that the MLflow UI shows a version's lineage: run it after `make demo`.

    .venv/bin/python infra/ui_check.py                 # sift-gsm8k@champion in mlflow/mlflow.db
    .venv/bin/python infra/ui_check.py --tracking-uri sqlite:////tmp/demo/mlflow/mlflow.db

Starts `mlflow ui` on 127.0.0.1 (a free port), opens the champion's version page and its
source run's page in headless Chromium (Debian package `chromium`), saves a screenshot and
the rendered DOM of each under --out, and looks in the DOM for what a reviewer looks for:
the version page's data md5 (`dvc.md5`), git SHA (`git.sha`) and links to the source run and
logged model; the run page's datasets with their DVC digests. Exits 1 naming what is missing.

Not a pytest test: CI has no Chromium, and the UI is a React app whose markup is MLflow's to
change; this is the documented check behind docs/concepts/registry-and-lineage.md ("Where
to look in the MLflow UI").
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from steps.registry.serve import (
    server_env,
    start_server,
    stop_server,
    wait_until_ready,
)
from steps.tracking import require_store

# The SPA renders after its API calls; 15 s of virtual time was enough on a loaded 2-core
# machine (5 s left the version page at its spinner).
VIRTUAL_TIME_MS = 15000
WINDOW = "1400,1000"
# For --docs-dir: the page without the UI's assistant side panel (right of x≈1040 at this
# width), 128 colours: ~40 KB a page instead of ~180 KB.
DOCS_CROP = {"version": (0, 0, 1040, 900), "run": (0, 0, 1040, 780)}


@dataclass(frozen=True)
class Page:
    name: str
    url: str
    expected: dict[str, str | None]  # what it must show → its text in the DOM (None: untagged)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pages(client: MlflowClient, base: str, model: str, alias: str) -> list[Page]:
    """The version page and its run's page, with the values the registry says they carry."""
    version = client.get_model_version_by_alias(model, alias)
    if not version.run_id or not version.source:
        raise SystemExit(f"{model}@{alias}: version {version.version} has no source run")
    run = client.get_run(version.run_id)
    tags = version.tags
    # MLflow 3 keeps a version's logged model as its source: models:/m-<id>
    logged_model_id = version.source.removeprefix("models:/")
    version_page = Page(
        "version",
        f"{base}/#/models/{model}/versions/{version.version}",
        {
            "data md5 (dvc.md5)": tags.get("dvc.md5"),
            "git SHA (git.sha)": tags.get("git.sha"),
            # hrefs end in the id and a quote: the id as text alone could be anywhere
            "link to the source run": f'/runs/{version.run_id}"',
            "link to the logged model": f'/models/{logged_model_id}"',
        },
    )
    # The run page lists the first dataset inline as "name (digest)" and the others behind a
    # "+N" badge (a popover): the first is looked for as shown, the others by their digest.
    inputs = [entry.dataset for entry in (run.inputs.dataset_inputs if run.inputs else [])]
    datasets = {f"dataset {d.name} (digest)": f"{d.name} ({d.digest})" for d in inputs[:1]}
    datasets |= {
        f"dataset {d.name} digest, behind '+{len(inputs) - 1}'": d.digest for d in inputs[1:]
    }
    run_page = Page(
        "run",
        f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
        {**datasets, "git SHA (git.sha)": run.data.tags.get("git.sha")},
    )
    return [version_page, run_page]


def render(chromium: str, url: str, out_dir: Path, name: str) -> str:
    """Screenshot to out_dir/<name>.png; returns the rendered DOM (also saved as .html)."""
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    common += [f"--window-size={WINDOW}", f"--virtual-time-budget={VIRTUAL_TIME_MS}"]
    screenshot = out_dir / f"{name}.png"
    subprocess.run(
        [*common, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120
    )
    dom = subprocess.run(
        [*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    (out_dir / f"{name}.html").write_text(dom)
    return dom


def save_for_docs(screenshot: Path, docs_dir: Path, name: str) -> Path:
    from PIL import Image

    docs_dir.mkdir(parents=True, exist_ok=True)
    out = docs_dir / f"champion-{name}-page.png"
    image = Image.open(screenshot).convert("RGB").crop(DOCS_CROP[name])
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('mlflow/mlflow.db').resolve()}")
    parser.add_argument("--model", default="sift-gsm8k")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--out", type=Path, default=Path(".sift/ui-check"))
    parser.add_argument("--docs-dir", type=Path, help="also save cropped PNGs here (docs/registry)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    if shutil.which(args.chromium) is None:
        print(f"--chromium {args.chromium!r}: not found (apt-get install chromium)")
        return 2
    try:
        require_store(args.tracking_uri)
    except ValueError as error:
        print(error)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=args.tracking_uri, registry_uri=args.tracking_uri)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.tracking_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path = args.out / "mlflow-ui.log"
    with log_path.open("wb") as log:
        server = start_server(command, server_env(args.tracking_uri), log)
    missing: list[str] = []
    try:
        print(f"mlflow ui on {base} (pid {server.pid}, log {log_path})")
        wait_until_ready(base, server, timeout_s=120, probe="/health")
        for page in pages(client, base, args.model, args.alias):
            dom = render(args.chromium, page.url, args.out, page.name)
            print(f"{page.name} page: {page.url} → {args.out / page.name}.png")
            if args.docs_dir:
                saved = save_for_docs(args.out / f"{page.name}.png", args.docs_dir, page.name)
                print(f"  for the docs: {saved}")
            for what, text in page.expected.items():
                found = text is not None and text in dom
                shown = text if text is not None else "(not tagged in the registry)"
                print(f"  {'ok     ' if found else 'MISSING'} {what}: {shown}")
                if not found:
                    missing.append(f"{page.name} page: {what} {shown}")
    finally:
        stop_server(server)
    if missing:
        print("missing from the UI: " + "; ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
