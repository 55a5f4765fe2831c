"""Hyperparameter documentation generated from the pydantic models (for `labfleet show`)."""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel


def _type_name(annotation: typing.Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _default(field: typing.Any) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return json.dumps(value.model_dump(mode="json"))
    return "required" if value is ... or repr(value) == "PydanticUndefined" else json.dumps(value, default=str)


def hparam_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) for every field of the model, in declaration order."""
    return [(name, _type_name(field.annotation), _default(field), field.description or "")
            for name, field in model.model_fields.items()]
