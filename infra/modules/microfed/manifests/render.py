"""Re-render the vendored Kubeflow manifests under infra/modules/microfed/manifests/ from their pinned upstreams.

`terraform plan` reads only the rendered files in this folder (kubeflow.tf points the kustomization data sources at
them), so plans and applies never fetch from GitHub. This script is the one place that does, and only when a
maintainer re-renders (to move a version, or to check the vendored files):

1. every upstream in UPSTREAMS is taken at its pinned commit, checked against its tag, and only the listed paths
   are extracted (`git archive`) into a temporary directory; each extracted file is checked against the blob id of
   the commit's tree, so a partial clone cannot go unnoticed. One repository may be pinned at two tags
   (kubeflow/trainer: the Training Operator v1 and Trainer v2); REWRITES and RENDERS name an upstream `<repo>@<tag>`;
2. in that temporary copy only, the remote kustomize resources are rewritten to extracted trees: KFP's argo-workflows
   bases (by URL and tag), and Trainer v2's JobSet release manifests (a release asset, replaced by the JobSet
   kustomization it is built from; the entry's note says why that is the same). REWRITES lists each one; the script
   fails if an entry is not found as written, or if any remote entry is left in the extracted kustomizations;
3. `kubectl kustomize` (or `kustomize build`) renders each entry of RENDERS into <name>/rendered.yaml, next to a
   kustomization.yaml that lists only that file;
4. SOURCES.json records the upstreams (repository, tag, commit, paths), the rewrites, the renderer and its
   version, and the upstream, sha256 and object count of every vendored folder. tests/test_vendored_manifests.py
   checks them.

Sources (one per upstream): by default a shallow fetch of the pinned commit from https://github.com/<repo> (needs
the network and git); `--source REPO=DIR` uses a local clone or bare mirror instead (for example
`--source kubeflow/pipelines=/work/.mirror/kubeflow+pipelines/repo`).

    python3 infra/modules/microfed/manifests/render.py [--source REPO=DIR ...] [--check]

`--check` renders into a temporary directory and compares it with the vendored files instead of writing them.
To move a version, change its tag and commit in UPSTREAMS (and the REWRITES' tag if KFP moves argo), render, and
review the diff of the rendered YAML. Standard library only: it runs under any Python 3.11+.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RENDERS", "REWRITES", "UPSTREAMS", "Render", "Rewrite", "Upstream", "main", "render_all"]

HERE = Path(__file__).resolve().parent
SOURCES_FILE = "SOURCES.json"
RENDERED_FILE = "rendered.yaml"
KUSTOMIZATION_FILE = "kustomization.yaml"


@dataclass(frozen=True, kw_only=True)
class Upstream:
    """A git repository pinned by tag and by the commit that tag named when it was vendored."""

    repo: str
    """GitHub owner/name."""
    tag: str
    """Release tag; a tag can move, so the commit below is what is extracted, and the tag must still name it."""
    commit: str
    """Full commit sha the tag resolved to."""
    paths: tuple[str, ...]
    """The only paths extracted (never the whole tree)."""

    @property
    def ref(self) -> str:
        """`<repo>@<tag>`: how REWRITES and RENDERS name it (one repository may be pinned at two tags)."""
        return f"{self.repo}@{self.tag}"

    @property
    def folder(self) -> str:
        """Its directory in the temporary copy."""
        return self.ref.replace("/", "+")


@dataclass(frozen=True, kw_only=True)
class Rewrite:
    """A remote kustomize resource in an upstream kustomization.yaml, replaced by a path into another upstream."""

    upstream: str
    """The upstream (`<repo>@<tag>`) whose kustomization.yaml names the remote resource."""
    file: str
    """The kustomization.yaml, relative to its upstream's root."""
    remote: str
    """The resource entry exactly as upstream writes it."""
    target: str
    """The upstream (`<repo>@<tag>`) that the remote URL points into (extracted beside the others)."""
    path: str
    """The folder of that upstream the URL names, or whose kustomize build the URL's file is."""
    note: str = ""
    """Why the replacement is the same objects, where the URL names a built file rather than a folder."""


@dataclass(frozen=True, kw_only=True)
class Render:
    """One vendored folder: the kustomization of an upstream that `kustomize build` renders into it."""

    name: str
    """Folder under infra/modules/microfed/manifests/ (kubeflow.tf names it)."""
    upstream: str
    """`<repo>@<tag>` of an entry of UPSTREAMS."""
    path: str
    """The kustomization folder, relative to the upstream's root."""


UPSTREAMS = (
    Upstream(
        repo="kubeflow/pipelines",
        tag="2.14.3",
        commit="fc3214d4b4d395cb2d5de940d3dbd7ebc295c330",
        paths=("manifests/kustomize",),
    ),
    # The Training Operator v1 (PyTorchJob): `training_operator = "training-operator-v1"`.
    Upstream(
        repo="kubeflow/trainer",
        tag="v1.9.4",
        commit="4445c12aa62e4345b0c2c6ac9b215a70eca46ed7",
        paths=("manifests",),
    ),
    # Kubeflow Trainer v2 (TrainJob): `training_operator = "trainer-v2"`, the release tests/schemas/TRAINER.md pins.
    # Only what overlays/manager and overlays/runtimes build is extracted: third-party/leaderworkerset (which neither
    # names) would be a second remote base.
    Upstream(
        repo="kubeflow/trainer",
        tag="v2.3.0",
        commit="658725bdae5c7e3a0854d93ac6ff492e109a22ab",
        paths=(
            "manifests/base",
            "manifests/overlays/manager",
            "manifests/overlays/runtimes",
            "manifests/third-party/jobset",
        ),
    ),
    # Trainer v2.3.0's third-party/jobset kustomization names JobSet v0.12.0's release manifests by URL.
    Upstream(
        repo="kubernetes-sigs/jobset",
        tag="v0.12.0",
        commit="f22e565ac3cc3265c7c45ef67ecffdc689af5d77",
        paths=("config/default", "config/components"),
    ),
    # KFP 2.14.3's third-party/argo kustomizations name these folders by URL at v3.6.7.
    Upstream(
        repo="argoproj/argo-workflows",
        tag="v3.6.7",
        commit="8d7dae690e152d19fb40f7affbb68fb783b32172",
        paths=("manifests/base", "manifests/namespace-install", "manifests/cluster-install"),
    ),
)

_KFP = "kubeflow/pipelines@2.14.3"
_ARGO = "argoproj/argo-workflows@v3.6.7"
_ARGO_URL = "https://github.com/argoproj/argo-workflows/manifests/{}?ref=v3.6.7"
_KFP_ARGO = "manifests/kustomize/third-party/argo/{}/kustomization.yaml"
REWRITES = (
    Rewrite(
        upstream=_KFP,
        file=_KFP_ARGO.format("base"),
        remote=_ARGO_URL.format("base/workflow-controller"),
        target=_ARGO,
        path="manifests/base/workflow-controller",
    ),
    Rewrite(
        upstream=_KFP,
        file=_KFP_ARGO.format("installs/namespace"),
        remote=_ARGO_URL.format("namespace-install/workflow-controller-rbac"),
        target=_ARGO,
        path="manifests/namespace-install/workflow-controller-rbac",
    ),
    Rewrite(
        upstream=_KFP,
        file=_KFP_ARGO.format("installs/namespace/cluster-scoped"),
        remote=_ARGO_URL.format("base/crds/minimal"),
        target=_ARGO,
        path="manifests/base/crds/minimal",
    ),
    # Not in the closure of the two KFP kustomizations rendered here (they serve KFP's cluster-wide Argo install),
    # rewritten too so that no remote reference is left in the temporary copy.
    Rewrite(
        upstream=_KFP,
        file=_KFP_ARGO.format("installs/cluster"),
        remote=_ARGO_URL.format("base/crds"),
        target=_ARGO,
        path="manifests/base/crds",
    ),
    Rewrite(
        upstream=_KFP,
        file=_KFP_ARGO.format("installs/cluster"),
        remote=_ARGO_URL.format("cluster-install/workflow-controller-rbac"),
        target=_ARGO,
        path="manifests/cluster-install/workflow-controller-rbac",
    ),
    # A release asset, not a folder: the kustomization it is built from stands in for it.
    Rewrite(
        upstream="kubeflow/trainer@v2.3.0",
        file="manifests/third-party/jobset/kustomization.yaml",
        remote="https://github.com/kubernetes-sigs/jobset/releases/download/v0.12.0/manifests.yaml",
        target="kubernetes-sigs/jobset@v0.12.0",
        path="config/default",
        note=(
            "JobSet's release manifests.yaml is `kustomize build config/default` at the tag (Makefile, target "
            "artifacts, after `kustomize edit set image controller=<registry>/jobset:<tag>` in "
            "config/components/manager; RELEASE.md: `make artifacts IMAGE_REGISTRY=registry.k8s.io/jobset`). "
            "config/default at v0.12.0 sets the image to the staging registry's jobset:v0.12.0, which the "
            "trainer's third-party/jobset kustomization renames to registry.k8s.io/jobset/jobset:v0.12.0, the "
            "release's image. Checked when vendored: the trainer's overlays/manager rendered against a manifests.yaml "
            "built that way (the release's image set in config/components/manager) is byte-identical"
        ),
    ),
)

RENDERS = (
    Render(name="kfp-cluster-scoped", upstream=_KFP, path="manifests/kustomize/cluster-scoped-resources"),
    Render(name="kfp", upstream=_KFP, path="manifests/kustomize/env/platform-agnostic"),
    Render(name="training-operator", upstream="kubeflow/trainer@v1.9.4", path="manifests/overlays/standalone"),
    # Kubeflow Trainer's own install (docs/operator-guides/installation.md at v2.3.0, "Install with Kustomize"): the
    # controller manager with its CRDs, webhooks and JobSet, then the built-in ClusterTrainingRuntimes.
    Render(name="trainer-v2", upstream="kubeflow/trainer@v2.3.0", path="manifests/overlays/manager"),
    Render(name="trainer-v2-runtimes", upstream="kubeflow/trainer@v2.3.0", path="manifests/overlays/runtimes"),
)


def _upstream(ref: str) -> Upstream:
    found = [u for u in UPSTREAMS if u.ref == ref]
    if len(found) != 1:
        raise SystemExit(f"{ref}: expected one entry of UPSTREAMS with that <repo>@<tag>, found {len(found)}")
    return found[0]


def _git(*args: str, cwd: Path | None = None) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True).stdout


def _fetch(upstream: Upstream, workdir: Path, base: str) -> Path:
    """A git directory holding the pinned commit: a shallow fetch of it from <base>/<repo> (GitHub by default)."""
    gitdir = workdir / "git" / upstream.folder
    gitdir.mkdir(parents=True)
    _git("init", "--quiet", "--bare", str(gitdir))
    url = f"{base}/{upstream.repo}"
    # ls-remote lists an annotated tag twice: the tag object, then the commit it names as <tag>^{}.
    listed = dict(
        reversed(line.split("\t", 1))
        for line in _git("--git-dir", str(gitdir), "ls-remote", url, f"refs/tags/{upstream.tag}").decode().splitlines()
    )
    ref = f"refs/tags/{upstream.tag}"
    tagged = listed.get(f"{ref}^{{}}", listed.get(ref))
    if tagged != upstream.commit:
        raise SystemExit(
            f"{url}: tag {upstream.tag} names {tagged or 'nothing'}, not the pinned {upstream.commit}; "
            "if the tag moved, review the upstream change, then update the commit in UPSTREAMS"
        )
    _git("--git-dir", str(gitdir), "fetch", "--quiet", "--depth", "1", url, upstream.commit)
    return gitdir


def _check_tag(upstream: Upstream, gitdir: Path) -> None:
    tagged = _git("--git-dir", str(gitdir), "rev-parse", f"{upstream.tag}^{{commit}}").decode().strip()
    if tagged != upstream.commit:
        raise SystemExit(
            f"{upstream.repo}: tag {upstream.tag} names {tagged}, not the pinned {upstream.commit}; "
            "the tag moved: review the upstream change, then update the commit in UPSTREAMS"
        )


def _extract(upstream: Upstream, gitdir: Path, dest: Path) -> None:
    """`git archive` of the pinned paths, each file checked against the blob id the commit's tree records."""
    archive = _git("--git-dir", str(gitdir), "archive", "--format=tar", upstream.commit, *upstream.paths)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="tar")
    listing = _git("--git-dir", str(gitdir), "ls-tree", "-r", upstream.commit, "--", *upstream.paths).decode()
    for line in listing.splitlines():
        meta, path = line.split("\t", 1)
        mode, kind, blob = meta.split()
        if kind != "blob" or mode == "120000":
            continue
        data = (dest / path).read_bytes()
        actual = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id of a file
        if actual != blob:
            raise SystemExit(f"{upstream.repo}@{upstream.commit}:{path} does not match its blob {blob}")


def _rewrite(root: Path) -> list[dict[str, str]]:
    """Point each remote base at the extracted copy; returns what was rewritten (recorded in SOURCES.json)."""
    done = []
    for rw in REWRITES:
        source, into = _upstream(rw.upstream), _upstream(rw.target)
        kfile = root / source.folder / rw.file
        target = root / into.folder / rw.path
        if not (target / KUSTOMIZATION_FILE).is_file():
            raise SystemExit(f"rewrite target {rw.target}:{rw.path} has no {KUSTOMIZATION_FILE}")
        local = Path(*[".."] * len(Path(rw.file).parent.parts), "..", into.folder, rw.path)
        text = kfile.read_text()
        entry = f"- {rw.remote}\n"
        if text.count(entry) != 1:
            raise SystemExit(
                f"{rw.upstream}:{rw.file}: expected the resource entry {rw.remote!r} once; upstream changed"
            )
        kfile.write_text(text.replace(entry, f"- {local.as_posix()}\n"))
        record = {"file": f"{rw.upstream}:{rw.file}", "from": rw.remote, "to": f"{rw.target}:{rw.path}"}
        done.append(record | ({"note": rw.note} if rw.note else {}))
    # Nothing remote may be left anywhere in the extracted trees: kustomize would fetch it (by a mutable tag).
    for kfile in sorted(root.rglob("*")):
        if kfile.name not in {"kustomization.yaml", "kustomization.yml", "Kustomization"} or "git" in kfile.parts:
            continue
        items = [line.strip() for line in kfile.read_text().splitlines() if line.strip().startswith("- ")]
        remote = [item for item in items if "?ref=" in item or "://" in item or item.startswith("- github.com/")]
        if remote:
            raise SystemExit(f"{kfile.relative_to(root)} still names {remote}: add a Rewrite for it to REWRITES")
    return done


def _kustomize() -> tuple[list[str], str]:
    """The renderer and its version (kustomize's output format can change between versions)."""
    if shutil.which("kustomize"):
        version = subprocess.run(["kustomize", "version"], check=True, capture_output=True, text=True).stdout
        return ["kustomize", "build"], version.strip()
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "version", "--client"], check=True, capture_output=True, text=True).stdout
        version = next((line.split(":", 1)[1].strip() for line in out.splitlines() if "Kustomize" in line), "?")
        return ["kubectl", "kustomize"], version
    raise SystemExit("neither kustomize nor kubectl is on PATH")


def _count(yaml_text: str) -> int:
    return sum(1 for doc in yaml_text.split("\n---\n") if doc.strip())


def render_all(sources: dict[str, Path], out: Path, base: str = "https://github.com") -> dict[str, object]:
    """Render every entry of RENDERS into out/<name>/ and return the SOURCES.json document."""
    command, version = _kustomize()
    with tempfile.TemporaryDirectory(prefix="microfed-render-") as tmp:
        root = Path(tmp)
        for upstream in UPSTREAMS:
            if upstream.repo in sources:
                gitdir = sources[upstream.repo]
                _check_tag(upstream, gitdir)
            else:
                gitdir = _fetch(upstream, root, base)
            _extract(upstream, gitdir, root / upstream.folder)
        rewrites = _rewrite(root)
        manifests: dict[str, object] = {}
        for r in RENDERS:
            upstream = _upstream(r.upstream)
            rendered = subprocess.run(
                [*command, str(root / upstream.folder / r.path)], check=True, capture_output=True, text=True
            ).stdout
            folder = out / r.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / RENDERED_FILE).write_text(rendered)
            header = f"# {upstream.repo} {upstream.tag} ({upstream.commit}) {r.path}, rendered by ../render.py"
            (folder / KUSTOMIZATION_FILE).write_text(
                f"{header}: do not edit.\n"
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n- {RENDERED_FILE}\n"
            )
            manifests[r.name] = {
                "repo": upstream.repo,
                "tag": upstream.tag,
                "path": r.path,
                "objects": _count(rendered),
                "sha256": {
                    name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                    for name in (KUSTOMIZATION_FILE, RENDERED_FILE)
                },
            }
    return {
        "renderer": {"command": " ".join(command), "kustomize": version},
        "upstreams": [
            {"repo": u.repo, "url": f"https://github.com/{u.repo}", "tag": u.tag, "commit": u.commit, "paths": u.paths}
            for u in UPSTREAMS
        ],
        "rewrites": rewrites,
        "manifests": manifests,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="REPO=DIR",
        help="a local clone or mirror of REPO (every tag UPSTREAMS pins of it)",
    )
    parser.add_argument("--check", action="store_true", help="compare with the vendored files; write nothing")
    parser.add_argument(
        "--base",
        default="https://github.com",
        help="where <owner>/<name> repositories are fetched from (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    known = {u.repo for u in UPSTREAMS}
    sources = {}
    for item in args.source:
        repo, _, directory = item.partition("=")
        if repo not in known or not directory:
            parser.error(f"--source {item!r}: expected REPO=DIR with REPO one of {sorted(known)}")
        sources[repo] = Path(directory)
    if not args.check:
        doc = render_all(sources, HERE, args.base)
        (HERE / SOURCES_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"rendered {', '.join(r.name for r in RENDERS)} into {HERE}")
        return 0
    with tempfile.TemporaryDirectory(prefix="microfed-check-") as tmp:
        doc = render_all(sources, Path(tmp), args.base)
        vendored = json.loads((HERE / SOURCES_FILE).read_text())
        if json.loads(json.dumps(doc)) != vendored:
            print("the vendored manifests differ from a fresh render (see SOURCES.json)", file=sys.stderr)
            return 1
    print("the vendored manifests match a fresh render")
    return 0


if __name__ == "__main__":
    sys.exit(main())
