"""Strict validation of rendered manifests: core kinds against the `kubernetes` package's models, the RayCluster
against KubeRay's CRD schema, and the two third-party kinds the chart renders against small closed schemas.

"Strict" means what `kubectl apply --validate=strict` means: an unknown field is an error, as is a missing
required field or a value of the wrong type.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes.client
import yaml

# A copy kept in the repository (provenance and licence in data/k8s/README.md).
CRD_PATH = Path(__file__).resolve().parents[2] / "data" / "k8s" / "ray.io_rayclusters.yaml"

# API groups whose kinds the `kubernetes` package models.
CORE_GROUPS = {"", "apps", "batch", "policy", "networking.k8s.io", "rbac.authorization.k8s.io", "autoscaling"}
# Keys whose values are quantities; the API server also takes plain numbers there.
QUANTITY_PARENTS = {"limits", "requests", "sizeLimit", "capacity", "hard"}
PRIMITIVES = {"str", "int", "float", "bool", "bytes", "object", "datetime", "date"}


def validate_core(obj: dict[str, Any]) -> list[str]:
    """Errors of a core-kind object, each prefixed with its field path; empty when valid."""
    group, _, version = obj["apiVersion"].rpartition("/")
    assert group in CORE_GROUPS, f"{obj['apiVersion']} is not a core API group"
    class_name = version[0].upper() + version[1:] + obj["kind"]
    if not hasattr(kubernetes.client, class_name):
        return [f"no model {class_name} for {obj['apiVersion']} {obj['kind']}"]
    return validate_against_model(_quantities_as_strings(obj), class_name, obj["kind"])


def validate_against_model(data: Any, type_name: str, path: str) -> list[str]:
    """Check `data` against a type of the client's `openapi_types` (`List[X]`/`Dict[str, X]`, or the older
    `list[X]`/`dict(str, X)` spelling), recursing into models."""
    if type_name[:5].lower() == "list[":
        if not isinstance(data, list):
            return [f"{path}: must be a list, got {type(data).__name__}"]
        return [e for i, item in enumerate(data) for e in validate_against_model(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name[:5].lower() in ("dict(", "dict["):
        if not isinstance(data, dict):
            return [f"{path}: must be a mapping, got {type(data).__name__}"]
        value_type = type_name[type_name.index(",") + 1 : -1].strip()
        return [e for k, v in data.items() for e in validate_against_model(v, value_type, f"{path}.{k}")]
    if type_name in PRIMITIVES:
        return _check_primitive(data, type_name, path)
    return _check_model(data, getattr(kubernetes.client, type_name), path)


def _quantities_as_strings(data: Any, key: str = "") -> Any:
    """A copy with numeric quantities (`cpu: 4`) spelled as strings, as the API server reads them; the client's
    models type every quantity as a string."""
    if isinstance(data, dict):
        if key in QUANTITY_PARENTS:
            return {k: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for k, v in data.items()}
        return {k: _quantities_as_strings(v, k) for k, v in data.items()}
    if isinstance(data, list):
        return [_quantities_as_strings(v, key) for v in data]
    if key in ("sizeLimit", "storage") and isinstance(data, int | float) and not isinstance(data, bool):
        return str(data)
    return data


def _check_primitive(data: Any, type_name: str, path: str) -> list[str]:
    if data is None or type_name in ("object", "datetime", "date"):
        return []
    # Secret data (`bytes`) is base64 text in a manifest.
    expected = {"str": str, "bytes": str, "int": int, "float": int | float, "bool": bool}[type_name]
    if isinstance(data, bool) and type_name != "bool":
        return [f"{path}: must be {type_name}, got bool {data!r}"]
    if not isinstance(data, expected):
        return [f"{path}: must be {type_name}, got {type(data).__name__} {data!r}"]
    return []


def _check_model(data: Any, klass: type, path: str) -> list[str]:
    if not isinstance(data, dict):
        return [f"{path}: must be a mapping ({klass.__name__}), got {type(data).__name__}"]
    attr_by_key = {key: attr for attr, key in klass.attribute_map.items()}
    errors = [f"{path}.{key}: unknown field of {klass.__name__}" for key in data if key not in attr_by_key]
    for key, value in data.items():
        if key in attr_by_key:
            errors += validate_against_model(value, klass.openapi_types[attr_by_key[key]], f"{path}.{key}")
    if not errors:
        # The model's constructor checks required fields (and some enums).
        try:
            klass(**{attr_by_key[k]: v for k, v in data.items()})
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            errors.append(f"{path}: {exc}")
    return errors


@functools.cache
def raycluster_schema() -> dict[str, Any]:
    """The RayCluster CRD's stored version schema, closed to unknown fields as the API server's strict mode is."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _close_objects(schema)
    return schema


def _close_objects(node: Any) -> None:
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_objects(value)


def validate_raycluster(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(raycluster_schema())
    errors = [_format_error(e) for e in validator.iter_errors(obj)]
    # The CRD leaves pod-template metadata open; the core models check the whole template strictly.
    spec = obj.get("spec", {})
    templates = [("spec.headGroupSpec.template", spec.get("headGroupSpec", {}).get("template"))]
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        templates.append((f"spec.workerGroupSpecs[{i}].template", group.get("template")))
    for path, template in templates:
        errors += validate_against_model(_quantities_as_strings(template), "V1PodTemplateSpec", path)
    return errors


def _format_error(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return f"{path or '<root>'}: {error.message}"


# The Prometheus Operator and Gateway API CRDs are not kept in data/k8s/: these closed schemas cover the fields the
# chart uses, so a typo still fails.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "labels": _LABELS, "annotations": _LABELS},
}
THIRD_PARTY_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": _LABELS},
                    },
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "relabelings": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                            "targetLabel": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    ("gateway.networking.k8s.io/v1", "GRPCRoute"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "parentRefs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": {
                                k: {"type": "string"} for k in ("group", "kind", "name", "namespace", "sectionName")
                            }
                            | {"port": {"type": "integer"}},
                        },
                    },
                    "hostnames": {"type": "array", "items": {"type": "string"}},
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "backendRefs": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["name", "port"],
                                        "additionalProperties": False,
                                        "properties": {"name": {"type": "string"}, "port": {"type": "integer"}},
                                    },
                                }
                            },
                        },
                    },
                },
            },
        },
    },
}


def validate_third_party(obj: dict[str, Any]) -> list[str]:
    schema = THIRD_PARTY_SCHEMAS[(obj["apiVersion"], obj["kind"])]
    return [_format_error(e) for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]


DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def validate_metadata(obj: dict[str, Any]) -> list[str]:
    """Object names and label values the API server would refuse."""
    meta = obj.get("metadata") or {}
    name, errors = meta.get("name", ""), []
    limit = 63 if obj["kind"] in ("Service", "RayCluster") else 253
    if not DNS_1123_LABEL.fullmatch(name.replace(".", "-")) or len(name) > limit:
        errors.append(f"metadata.name {name!r}: not a valid {obj['kind']} name")
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            errors.append(f"metadata.labels.{key}: invalid label value {value!r}")
    return errors


def validate(obj: dict[str, Any]) -> list[str]:
    """Every error of one rendered object."""
    errors = validate_metadata(obj)
    group = obj["apiVersion"].rpartition("/")[0]
    if group in CORE_GROUPS:
        return errors + validate_core(obj)
    if (obj["apiVersion"], obj["kind"]) == ("ray.io/v1", "RayCluster"):
        return errors + validate_raycluster(obj)
    if (obj["apiVersion"], obj["kind"]) in THIRD_PARTY_SCHEMAS:
        return errors + validate_third_party(obj)
    return [*errors, f"{obj['apiVersion']} {obj['kind']}: no schema to validate it against"]
