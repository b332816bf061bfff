"""Check every provider, resource and data block under infra/ against the schemas of the pinned provider versions.

`terraform validate` needs the providers, which cannot be downloaded on every machine that runs the tests, and
python-hcl2 and checkov know no provider schema. This check reads the trimmed schemas in infra/schemas/ (taken from
the providers themselves by infra/schemas/regenerate.py, at the versions infra/versions.tf pins) and reports, for
each .tf file under the directories given:

- an argument or block the schema does not have (with the closest names it does have);
- a nested block written as an argument (`target = { ... }`) or an argument written as a block (`x { ... }`);
- a computed-only attribute that is set;
- a missing required argument, too few or too many blocks (min_items / max_items);
- an `exactly_one_of` / `at_least_one_of` / `conflicts_with` / `required_with` rule of the provider broken;
- a value outside the schema's allowed values (literals, and variables' defaults and locals that are literals);
- a provider whose pin in versions.tf is not the version of its schema file, or that has no schema;
- a provider block in a module that another directory calls (a "legacy module": Terraform refuses count, for_each
  and depends_on on its calls, and a removed call leaves its resources without a provider to destroy them).

A directory that another directory under the same root calls with a local `source` ("./..." or "../...") is a
child module; every other directory is a root configuration. A root configuration must configure every provider
that it or the modules it calls use (Terraform gives an unconfigured one an empty configuration, which is checked
like any other), and the value a child module's variable gets from each call is checked as well as its default.

Usage (make infra-check runs it):

    python infra/schema_check.py [--schemas infra/schemas] [DIR ...]    # default: infra/

Each violation is printed as `file: address: what is wrong`; the exit status is 1 when there is any.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
from hcl2.utils import SerializationOptions

__all__ = ["Violation", "check", "load_schemas", "main"]

INFRA = Path(__file__).resolve().parent
SCHEMAS = INFRA / "schemas"

# explicit_blocks marks every block with "__is_block__": `x { ... }` parses to [{..., "__is_block__": True}], while
# `x = { ... }` and `x = [{ ... }]` parse to a dict / list of dicts without the mark. This is what tells a block from
# an argument.
_OPTIONS = SerializationOptions(
    with_comments=False, explicit_blocks=True, strip_string_quotes=True, preserve_heredocs=False
)
_MARK = "__is_block__"

# Terraform's own arguments and blocks (not the provider's), per kind of block.
_META = {
    "resource": {"count", "for_each", "provider", "depends_on", "lifecycle", "provisioner", "connection"},
    "data": {"count", "for_each", "provider", "depends_on", "lifecycle"},
    "provider": {"alias", "version"},
}
_LIFECYCLE = {
    "create_before_destroy",
    "prevent_destroy",
    "ignore_changes",
    "replace_triggered_by",
    "precondition",
    "postcondition",
}
_REFERENCE = re.compile(r"^\$\{(var|local)\.(\w+)\}$")


@dataclass(frozen=True)
class Violation:
    """One thing Terraform (or the provider) would reject."""

    file: str
    address: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.address}: {self.message}"


def load_schemas(directory: Path = SCHEMAS) -> dict[str, dict[str, Any]]:
    """{provider source: schema} from every <local name>.json in directory."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        schema = json.loads(path.read_text())
        schema["file"] = path.name
        out[schema["provider"]] = schema
    return out


def _is_block(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and v.get(_MARK) for v in value)


def _unset(value: Any) -> bool:
    return value is None or value == "${null}"


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> str:
    """A .tf file's text parsed (python-hcl2 is slow: most of a check's time), kept as JSON by content, so a file
    seen before (another copy of the same tree, a second check) is not parsed again."""
    return json.dumps(hcl2.loads(text, serialization_options=_OPTIONS))


def _parse(text: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(_parsed(text))  # a fresh object each time: callers may change it
    return parsed


class Module:
    """The .tf files of one directory: what they declare, for checking them."""

    def __init__(self, directory: Path, root: Path) -> None:
        self.directory = directory
        self.root = root
        self.docs: dict[Path, dict[str, Any]] = {}
        self.errors: list[Violation] = []
        for path in sorted(directory.glob("*.tf")):
            try:
                self.docs[path] = _parse(path.read_text())
            except Exception as exc:  # python-hcl2 raises lark's exceptions, among others
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.errors.append(Violation(self.name(path), "-", f"does not parse: {first}"))
        self.providers: dict[str, tuple[str, str | None, str]] = {}  # local -> (source, version, file)
        self.variables: dict[str, Any] = {}
        self.locals: dict[str, Any] = {}
        self.calls: dict[str, tuple[Path, dict[str, Any], Path]] = {}  # name -> (directory, arguments, file)
        self.callers: list[tuple[Module, dict[str, Any]]] = []  # (calling module, the arguments of its call)
        self.configured: set[str] = set()  # sources of its provider blocks (without alias), once checked
        self.used: dict[str, Path] = {}  # source -> first file whose resource or data source uses it, once checked
        for path, doc in self.docs.items():
            for terraform in doc.get("terraform", []):
                for required in terraform.get("required_providers", []):
                    for local, spec in required.items():
                        if local == _MARK:
                            continue
                        if isinstance(spec, dict):
                            self.providers[local] = (
                                spec.get("source", f"hashicorp/{local}"),
                                spec.get("version"),
                                self.name(path),
                            )
            for variable in doc.get("variable", []):
                for name, body in variable.items():
                    if name != _MARK:
                        self.variables[name] = body
            for block in doc.get("locals", []):
                self.locals.update({k: v for k, v in block.items() if k != _MARK})
            for block in doc.get("module", []):
                for name, body in block.items():
                    source = body.get("source") if isinstance(body, dict) else None
                    if name != _MARK and isinstance(source, str) and source.startswith(("./", "../")):
                        self.calls[name] = ((directory / source).resolve(), body, path)

    def name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root.parent))
        except ValueError:
            return str(path)

    def source_of(self, local: str) -> str:
        # Without a required_providers entry, Terraform assumes hashicorp/<local name>.
        return self.providers.get(local, (f"hashicorp/{local}", None, ""))[0]

    def literal(self, value: Any) -> Any:
        """The value if it is a literal, or a var./local. reference to a literal (a variable's default); else None."""
        if not isinstance(value, str):
            return value
        reference = _REFERENCE.match(value)
        if reference:
            kind, name = reference.groups()
            value = self.variables.get(name, {}).get("default") if kind == "var" else self.locals.get(name)
            return value if isinstance(value, str) and "${" not in value else None
        return None if "${" in value else value

    def literals(self, value: Any, seen: frozenset[Path] = frozenset()) -> list[Any]:
        """Every literal `value` can take: literal() for a value of this directory, and for `var.x` of a called
        module, what each call passes (followed into the caller's variables and locals), or the default where a
        call passes nothing."""
        reference = _REFERENCE.match(value) if isinstance(value, str) else None
        if not reference or reference.group(1) != "var" or not self.callers or self.directory in seen:
            return [self.literal(value)]
        name = reference.group(2)
        out: list[Any] = []
        for caller, arguments in self.callers:
            if name in arguments:
                out += caller.literals(arguments[name], seen | {self.directory})
            else:
                out.append(self.literal(value))
        return out


class Checker:
    def __init__(self, schemas: dict[str, dict[str, Any]]) -> None:
        self.schemas = schemas
        self.violations: list[Violation] = []
        self.checked = 0

    def report(self, module: Module, path: Path, address: str, message: str) -> None:
        self.violations.append(Violation(module.name(path), address, message))

    # -- per module -------------------------------------------------------------------------------------------

    def module(self, module: Module, is_root: bool) -> None:
        """Check one directory's blocks; record in module.used the providers its resources and data sources use."""
        self.violations += module.errors
        self.pins(module)
        configured: set[str] = set()
        used: dict[str, Path] = {}
        for path, doc in module.docs.items():
            for block in doc.get("provider", []):
                for local, body in block.items():
                    if local != _MARK:
                        self.provider_block(module, path, local, body)
                        configured |= set() if "alias" in body else {local}
                        if not is_root:
                            self.report(
                                module,
                                path,
                                f"provider.{local}",
                                "a module that another configuration calls must not configure providers (Terraform's"
                                ' "Providers Within Modules": such a legacy module cannot be called with count,'
                                " for_each or depends_on): configure it in the calling root configuration",
                            )
            for kind, key in (("resource", "resources"), ("data", "data_sources")):
                for block in doc.get(kind, []):
                    for rtype, named in block.items():
                        if rtype == _MARK:
                            continue
                        for name, body in named.items():
                            if name != _MARK:
                                local = self.resource_block(module, path, kind, key, rtype, name, body)
                                used.setdefault(local, path)
        module.configured = {module.source_of(local) for local in configured}
        module.used = {module.source_of(local): path for local, path in sorted(used.items())}

    def unconfigured(self, root: Module, modules: dict[Path, Module]) -> None:
        """A provider that the root configuration, or a module it calls, uses without a provider block of the root
        is configured with an empty body, which must be valid too."""
        used: dict[str, tuple[Module, Path]] = {}
        pending, seen = [root], set()
        while pending:
            module = pending.pop(0)
            if module.directory in seen:
                continue
            seen.add(module.directory)
            for source, path in module.used.items():
                used.setdefault(source, (module, path))
            pending += [modules[d] for d, _, _ in module.calls.values() if d in modules]
        for source, (module, path) in sorted(used.items()):
            schema = self.schemas.get(source)
            if source not in root.configured and schema is not None:
                local = source.split("/")[-1]
                address = f"provider.{local} (no provider block: an empty configuration)"
                self.body(module, path, address, {}, schema["provider_config"])

    def pins(self, module: Module) -> None:
        """Each provider with a schema is pinned to exactly the schema's version."""
        for local, (source, version, file) in sorted(module.providers.items()):
            schema = self.schemas.get(source)
            address = f"terraform.required_providers.{local}"
            if schema is None:
                self.violations.append(
                    Violation(file, address, f"no schema for {source} in infra/schemas/: add it to regenerate.py")
                )
                continue
            pinned = re.fullmatch(r"=?\s*(\d+\.\d+\.\d+)", (version or "").strip())
            if not pinned or pinned.group(1) != schema["version"]:
                self.violations.append(
                    Violation(
                        file,
                        address,
                        f"version {version!r} is not the one infra/schemas/{schema['file']} describes: pin "
                        f'"= {schema["version"]}", or move the pin and rerun {schema["regenerate"]}',
                    )
                )

    def _schema(self, module: Module, path: Path, address: str, local: str) -> dict[str, Any] | None:
        source = module.source_of(local)
        schema = self.schemas.get(source)
        if schema is None:
            hint = "" if local in module.providers else f" (no required_providers entry for {local!r})"
            self.report(module, path, address, f"no schema for provider {source}{hint}")
        return schema

    def provider_block(self, module: Module, path: Path, local: str, body: dict[str, Any]) -> None:
        address = f"provider.{local}"
        schema = self._schema(module, path, address, local)
        if schema is not None:
            self.checked += 1
            self.body(module, path, address, body, schema["provider_config"], _META["provider"])

    def resource_block(
        self, module: Module, path: Path, kind: str, key: str, rtype: str, name: str, body: dict[str, Any]
    ) -> str:
        """Check one resource or data block; return the local name of its provider."""
        address = f"{'data.' if kind == 'data' else ''}{rtype}.{name}"
        provider = body.get("provider")
        local = provider.strip("${}").split(".")[0] if isinstance(provider, str) else rtype.split("_")[0]
        schema = self._schema(module, path, address, local)
        if schema is None:
            return local
        block = schema[key].get(rtype)
        if block is None:
            what = "data source" if kind == "data" else "resource"
            self.report(
                module,
                path,
                address,
                f"{schema['provider']} {schema['version']} has no {what} {rtype} in infra/schemas/{schema['file']}"
                f" (a new type: add it to EXTRA in infra/schemas/regenerate.py and rerun {schema['regenerate']})",
            )
            return local
        self.checked += 1
        self.body(module, path, address, body, block, _META[kind])
        for lifecycle in body.get("lifecycle", []) if _is_block(body.get("lifecycle")) else []:
            for arg in set(lifecycle) - _LIFECYCLE - {_MARK}:
                self.report(module, path, f"{address}.lifecycle", f"unknown lifecycle argument `{arg}`")
        return local

    # -- one body against one block schema -------------------------------------------------------------------

    def body(
        self,
        module: Module,
        path: Path,
        address: str,
        body: dict[str, Any],
        schema: dict[str, Any],
        meta: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        attributes: dict[str, Any] = schema["attributes"]
        blocks: dict[str, Any] = schema["blocks"]
        dynamic: dict[str, int] = {}
        for dyn in body.get("dynamic", []) if "dynamic" not in attributes and "dynamic" not in blocks else []:
            for label, spec in dyn.items():
                if label == _MARK:
                    continue
                dynamic[label] = dynamic.get(label, 0) + 1
                where = f"{address}.dynamic.{label}"
                if label in attributes:
                    self.report(module, path, where, f"`{label}` is an argument, not a block: dynamic makes blocks")
                elif label not in blocks:
                    self.report(module, path, where, _unknown("block", label, blocks))
                else:
                    for content in spec.get("content", []) if _is_block(spec.get("content")) else []:
                        self.body(module, path, where, content, blocks[label]["block"])
                    if not _is_block(spec.get("content")):
                        self.report(module, path, where, "a dynamic block needs a `content { ... }` block")
        for key, value in body.items():
            if key in (_MARK, "dynamic") and key not in attributes and key not in blocks:
                continue
            if key in meta:
                continue
            where = f"{address}.{key}"
            if key in attributes:
                attr = attributes[key]
                if _is_block(value) and attr["type"].startswith(("list(object", "set(object")):
                    pass  # Terraform lets a list/set-of-objects attribute be written as blocks (blocktoattr)
                elif _is_block(value):
                    self.report(
                        module, path, where, f"`{key}` is an argument, not a block: write `{key} = ...`, not `{key} {{`"
                    )
                elif attr.get("computed") and not attr.get("optional") and not attr.get("required"):
                    self.report(module, path, where, f"`{key}` is computed by the provider and cannot be set")
                else:
                    self.allowed(module, path, where, value, attr)
            elif key in blocks:
                if not _is_block(value):
                    self.report(
                        module,
                        path,
                        where,
                        f"`{key}` is a nested block, not an argument: write `{key} {{ ... }}`, not `{key} = ...`",
                    )
                    continue
                nested = blocks[key]
                for i, item in enumerate(value):
                    label = where if len(value) == 1 else f"{where}[{i}]"
                    self.body(module, path, label, item, nested["block"])
            else:
                self.report(module, path, where, _unknown("argument", key, {**attributes, **blocks}))
        for key, attr in sorted(attributes.items()):
            if attr.get("required") and (key not in body or _unset(body[key])):
                self.report(module, path, address, f"missing required argument `{key}`")
        for key, nested in sorted(blocks.items()):
            count = len(body[key]) if _is_block(body.get(key)) else 0
            if key in dynamic:
                continue  # a dynamic block's count is known only at plan time
            low, high = nested.get("min_items") or 0, nested.get("max_items")
            if nested.get("nesting") == "single":
                high = 1
            if count < low:
                self.report(module, path, address, f"needs at least {low} `{key}` block(s), has {count}")
            if high is not None and count > high:
                self.report(module, path, address, f"allows at most {high} `{key}` block(s), has {count}")
        for rule in schema.get("constraints", []):
            self.constraint(module, path, address, body, rule)

    def constraint(self, module: Module, path: Path, address: str, body: dict[str, Any], rule: dict[str, Any]) -> None:
        def is_set(key: str) -> bool:
            return key in body and not _unset(body[key])

        kind = rule["rule"]
        if kind in ("exactly_one_of", "at_least_one_of"):
            group = rule["attributes"]
            given = [k for k in group if is_set(k)]
            names = ", ".join(f"`{k}`" for k in group)
            if not given:
                self.report(module, path, address, f"needs {kind.replace('_', ' ')} {names}; none is set")
            elif kind == "exactly_one_of" and len(given) > 1:
                self.report(module, path, address, f"takes exactly one of {names}; {', '.join(given)} are set")
        elif is_set(rule["attribute"]):
            others = rule["with"]
            if kind == "conflicts_with" and any(is_set(k) for k in others):
                clash = ", ".join(f"`{k}`" for k in others if is_set(k))
                self.report(module, path, address, f"`{rule['attribute']}` conflicts with {clash}")
            if kind == "required_with" and not all(is_set(k) for k in others):
                need = ", ".join(f"`{k}`" for k in others if not is_set(k))
                self.report(module, path, address, f"`{rule['attribute']}` also needs {need}")

    def allowed(self, module: Module, path: Path, address: str, value: Any, attr: dict[str, Any]) -> None:
        values = attr.get("allowed_values")
        if not values:
            return
        fold = attr.get("allowed_values_ignore_case")
        for literal in dict.fromkeys(v for v in module.literals(value) if isinstance(v, str)):
            if (literal.lower() in {v.lower() for v in values}) if fold else (literal in values):
                continue
            shown = repr(literal) if literal == value else f"{value[2:-1]} = {literal!r}"
            self.report(module, path, address, f"{shown} is not one of the allowed values {values}")


def _unknown(what: str, key: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f" (did you mean {', '.join(f'`{c}`' for c in close)}?)" if close else ""
    return f"unknown {what} `{key}`: the schema has no such name{hint}"


def modules(root: Path) -> list[Path]:
    """Every directory under root (root included) that holds .tf files, outside .terraform/."""
    found = {p.parent for p in root.rglob("*.tf") if ".terraform" not in p.parts}
    return sorted(found)


def check(root: Path, schemas: dict[str, dict[str, Any]] | None = None) -> tuple[list[Violation], int]:
    """(violations, number of blocks checked) for every module directory under root."""
    checker = Checker(schemas if schemas is not None else load_schemas())
    root = root.resolve()
    found = {directory: Module(directory, root) for directory in modules(root)}
    for module in found.values():
        for target, arguments, _ in module.calls.values():
            if target in found:
                found[target].callers.append((module, arguments))
    for module in found.values():
        checker.module(module, is_root=not module.callers)
    for module in found.values():
        if not module.callers:
            checker.unconfigured(module, found)
    return checker.violations, checker.checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, default=[INFRA], help="Terraform roots (default: infra/)")
    parser.add_argument("--schemas", type=Path, default=SCHEMAS, help="folder of <provider>.json schemas")
    args = parser.parse_args(argv)
    schemas = load_schemas(args.schemas)
    if not schemas:
        print(f"no schemas in {args.schemas}: run python infra/schemas/regenerate.py", file=sys.stderr)
        return 2
    failed = False
    for root in args.dirs:
        violations, checked = check(root, schemas)
        for violation in violations:
            print(violation)
        versions = ", ".join(f"{s['provider']} {s['version']}" for s in schemas.values())
        status = f"{len(violations)} violation(s)" if violations else "no violations"
        shown = root.resolve().relative_to(Path.cwd()) if root.resolve().is_relative_to(Path.cwd()) else root
        print(f"schema check of {shown}/: {checked} provider/resource/data blocks against {versions}: {status}")
        failed = failed or bool(violations)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
