"""Pack wheels into checksummed parts small enough for one GPU call, and put them back together.

The GPU machine has no package index and a call carries at most 64 MiB, so
the serving runtime travels over several calls:

    pack      (here)  recompress each wheel of a tier with LZMA inside the zip
                      (pip installs such wheels unchanged; CUDA libraries shrink
                      about 2.2x against the wheels' deflate), tar them and cut
                      the tar into parts of at most --part-mib MiB; record
                      every part's size and SHA-256 in MANIFEST.tsv and the
                      sizes in SIZES.txt
    receive   (GPU)   copy the parts that came with this call into the store
                      (a directory that outlives the call while the machine
                      stays warm), each checked against the manifest
    assemble  (GPU)   once a tier's parts are all there, join and check them
                      and unpack its wheels; print the wheel directory
    status    (GPU)   which parts of which tier are still missing

    python stage_parts.py pack --tier core --wheels DIR --out .stage/e2e
    python stage_parts.py receive --stage .stage/e2e --store /tmp/e2e-store
    python stage_parts.py assemble --stage .stage/e2e --store /tmp/e2e-store --tier core
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MANIFEST = "MANIFEST.tsv"
SIZES = "SIZES.txt"
MIB = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def recompress(src: Path, dst: Path) -> Path:
    """``src`` wheel rewritten with every member LZMA-compressed (same names, contents and RECORD)."""
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            member.external_attr = info.external_attr
            member.compress_type = zipfile.ZIP_LZMA
            zout.writestr(member, zin.read(info))
    tmp.replace(dst)
    return dst


def read_manifest(stage: Path) -> list[tuple[str, str, int, str]]:
    """``(tier, name, bytes, sha256)`` rows; ``name`` is a part, or ``TIER.tar`` for the whole."""
    rows = []
    for line in (stage / MANIFEST).read_text().splitlines():
        if line and not line.startswith("#"):
            tier, name, size, digest = line.split("\t")
            rows.append((tier, name, int(size), digest))
    return rows


def write_manifest(stage: Path, tier: str, rows: list[tuple[str, str, int, str]]) -> None:
    """Replace ``tier``'s rows of the manifest (other tiers' rows are kept)."""
    kept = [r for r in read_manifest(stage) if r[0] != tier] if (stage / MANIFEST).exists() else []
    lines = ["# tier\tfile\tbytes\tsha256 (parts under parts/; TIER.tar is the joined parts)"]
    lines += ["\t".join(map(str, r)) for r in kept + rows]
    (stage / MANIFEST).write_text("\n".join(lines) + "\n")


def pack(tier: str, wheels: Path, out: Path, part_mib: int, jobs: int) -> None:
    """Recompress ``wheels/*.whl``, tar and split them; update MANIFEST.tsv and SIZES.txt."""
    sources = sorted(wheels.glob("*.whl"))
    if not sources:
        sys.exit(f"no wheels in {wheels}")
    cache = out / "lzma"  # recompressed wheels, reused when a tier is packed again
    cache.mkdir(parents=True, exist_ok=True)
    todo = [s for s in sources if not (cache / s.name).exists()]
    targets = [cache / s.name for s in todo]
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(recompress, todo, targets))
    else:
        list(map(recompress, todo, targets))
    packed = [cache / s.name for s in sources]
    archive = out / f"{tier}.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for wheel in packed:
            tar.add(wheel, arcname=wheel.name)
    parts_dir = out / "parts"
    parts_dir.mkdir(exist_ok=True)
    for old in parts_dir.glob(f"{tier}.*"):
        old.unlink()
    rows = [(tier, archive.name, archive.stat().st_size, sha256(archive))]
    with archive.open("rb") as f:
        for index, chunk in enumerate(iter(lambda: f.read(part_mib * MIB), b"")):
            part = parts_dir / f"{tier}.{index:03d}"
            part.write_bytes(chunk)
            rows.append((tier, part.name, len(chunk), sha256(part)))
    archive.unlink()
    write_manifest(out, tier, rows)
    report = [f"tier {tier}: {len(sources)} wheels, {len(rows) - 1} parts of <= {part_mib} MiB"]
    for src, dst in zip(sources, packed, strict=True):
        report.append(f"  {src.stat().st_size / MIB:9.1f} MiB -> {dst.stat().st_size / MIB:8.1f} MiB  {src.name}")
    raw = sum(s.stat().st_size for s in sources) / MIB
    report.append(f"  {raw:9.1f} MiB -> {rows[0][2] / MIB:8.1f} MiB  total (tar of LZMA wheels)")
    sizes = out / SIZES
    previous = sizes.read_text().split("\n\n") if sizes.exists() else []
    blocks = [b.strip() for b in previous if b.strip() and not b.strip().startswith(f"tier {tier}:")]
    blocks.append("\n".join(report))
    sizes.write_text("\n\n".join(blocks) + "\n")


def receive(stage: Path, store: Path) -> None:
    """Copy this call's parts into ``store`` after checking each against the manifest."""
    store.mkdir(parents=True, exist_ok=True)
    expected = {name: (size, digest) for _, name, size, digest in read_manifest(stage)}
    for part in sorted((stage / "parts").glob("*")) if (stage / "parts").exists() else []:
        size, digest = expected.get(part.name, (None, None))
        if digest is None:
            sys.exit(f"{part.name} is not in the manifest (a part of another staging run?)")
        if part.stat().st_size != size or sha256(part) != digest:
            sys.exit(f"{part.name} does not match its SHA-256 in the manifest")
        shutil.copyfile(part, store / part.name)


def missing_parts(stage: Path, store: Path) -> dict[str, list[str]]:
    """Parts of each tier not yet (correctly sized) in ``store``."""
    missing: dict[str, list[str]] = {}
    for tier, name, size, _ in read_manifest(stage):
        if name.endswith(".tar"):
            missing.setdefault(tier, [])
            continue
        held = store / name
        if not held.exists() or held.stat().st_size != size:
            missing.setdefault(tier, []).append(name)
    return missing


def assemble(stage: Path, store: Path, tier: str) -> Path:
    """Join a complete tier, check the whole, unpack its wheels into ``store/wheels/TIER``."""
    rows = [r for r in read_manifest(stage) if r[0] == tier]
    if not rows:
        sys.exit(f"tier {tier} is not in the manifest")
    if missing_parts(stage, store).get(tier):
        sys.exit(f"tier {tier} is incomplete: {', '.join(missing_parts(stage, store)[tier])} missing")
    wheels = store / "wheels" / tier
    whole = next(r for r in rows if r[1].endswith(".tar"))
    done = wheels / ".sha256"
    if done.exists() and done.read_text() == whole[3]:
        return wheels
    archive = store / whole[1]
    with archive.open("wb") as out:
        for _, name, _, _ in sorted(r for r in rows if not r[1].endswith(".tar")):
            with (store / name).open("rb") as f:
                shutil.copyfileobj(f, out, MIB)
    if sha256(archive) != whole[3]:
        sys.exit(f"joined {archive.name} does not match its SHA-256")
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(wheels, filter="data")
    archive.unlink()
    done.write_text(whole[3])
    return wheels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--tier", required=True)
    p.add_argument("--wheels", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--part-mib", type=int, default=48)
    p.add_argument("--jobs", type=int, default=2)
    for name in ("receive", "status", "assemble"):
        p = sub.add_parser(name)
        p.add_argument("--stage", type=Path, required=True, help="directory holding MANIFEST.tsv and parts/")
        p.add_argument("--store", type=Path, required=True, help="where parts accumulate across calls")
        if name == "assemble":
            p.add_argument("--tier", required=True)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.tier, args.wheels, args.out, args.part_mib, args.jobs)
    elif args.command == "receive":
        receive(args.stage, args.store)
    elif args.command == "status":
        for tier, names in missing_parts(args.stage, args.store).items():
            print(f"{tier}: {'complete' if not names else 'missing ' + ' '.join(names)}")
    else:
        print(assemble(args.stage, args.store, args.tier))


if __name__ == "__main__":
    main()
