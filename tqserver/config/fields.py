"""The generic machinery: each key is described once, on its attrs field, by a default plus a
*kind* (a small checker/converter); one walker checks a YAML mapping against a class, so
adding a key is one line and every error names file:line:column and the dotted key."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any, Callable

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from tqserver.config.errors import ConfigError, ConfigWarning, Position

# ---------------------------------------------------------------------------
# Kinds: callables (value, ctx, key, pos) -> converted value, or raise.

Kind = Callable[[Any, "_Context", str, Position], Any]


def _describe(value: Any) -> str:
    """Name a YAML value the way a user wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {int(value)}"
    if isinstance(value, float):
        return f"number {float(value)}"
    if isinstance(value, str):
        return f"string {str(value)!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(value, lo, hi, ctx, key, pos) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            bound = f"must be >= {lo}"
        elif lo is None:
            bound = f"must be <= {hi}"
        else:
            bound = f"must be between {lo} and {hi}"
        raise ctx.error(key, pos, f"{bound}, got {value}")


def _int(lo: int | None = None, hi: int | None = None) -> Kind:
    def check(value, ctx, key, pos):
        if not _is_int(value):
            raise ctx.error(key, pos, f"expected an integer, got {_describe(value)}")
        _check_range(int(value), lo, hi, ctx, key, pos)
        return int(value)

    return check


def _float(lo: float | None = 0) -> Kind:
    def check(value, ctx, key, pos):
        if not (_is_int(value) or isinstance(value, float)):
            raise ctx.error(key, pos, f"expected a number, got {_describe(value)}")
        _check_range(float(value), lo, None, ctx, key, pos)
        return float(value)

    return check


def _bool(value, ctx, key, pos):
    if not isinstance(value, bool):
        raise ctx.error(key, pos, f"expected true or false, got {_describe(value)}")
    return value


def _str(null_ok: bool = False, numbers_ok: bool = False) -> Kind:
    """A string; null means "" where "" is the default, numbers where they make sense."""

    def check(value, ctx, key, pos):
        if value is None and null_ok:
            return ""
        if numbers_ok and (_is_int(value) or isinstance(value, float)):
            return str(value)
        if not isinstance(value, str):
            raise ctx.error(key, pos, f"expected a string, got {_describe(value)}")
        return str(value)

    return check


def _optional(kind: Kind) -> Kind:
    def check(value, ctx, key, pos):
        return None if value is None else kind(value, ctx, key, pos)

    return check


def _choice(*choices: str) -> Kind:
    def check(value, ctx, key, pos):
        if isinstance(value, str) and value in choices:
            return str(value)
        message = f"must be one of {', '.join(choices)}, got {_describe(value)}"
        close = difflib.get_close_matches(str(value), choices, 1)
        if close:
            message += f"; did you mean {close[0]!r}?"
        raise ctx.error(key, pos, message)

    return check


def _int_choice(*choices: int) -> Kind:
    def check(value, ctx, key, pos):
        if _is_int(value) and value in choices:
            return int(value)
        allowed = " or ".join(str(c) for c in choices)
        raise ctx.error(key, pos, f"must be {allowed}, got {_describe(value)}")

    return check


def _url_path(value, ctx, key, pos):
    value = _str()(value, ctx, key, pos)
    if not value.startswith("/"):
        raise ctx.error(key, pos, f"must start with '/', got {value!r}")
    return value


def _size(value, ctx, key, pos):
    if _is_int(value):
        _check_range(int(value), 0, None, ctx, key, pos)
        return int(value)
    if value is None or isinstance(value, str):
        try:
            return parse_size(value or "")
        except ValueError as e:
            raise ctx.error(key, pos, str(e)) from None
    raise ctx.error(key, pos, f'expected a size such as "512MiB", got {_describe(value)}')


def _log_file(value, ctx, key, pos):
    """~, null or "" all mean: no log file (None)."""
    if value is None or value in ("", "~"):
        return None
    return _str()(value, ctx, key, pos)


def _file_mode(value, ctx, key, pos):
    """An octal permission mode written as a string ("0640"): YAML reads an unquoted 0640
    as the decimal 640."""
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value.strip()):
        return int(value, 8)
    raise ctx.error(key, pos, f'expected an octal mode such as "0640", got {_describe(value)}')


def _enabled(value, ctx, key, pos):
    if isinstance(value, bool):
        return value
    aliases = {
        "development": "development",
        "dev": "development",
        "production": "production",
        "prod": "production",
    }
    if isinstance(value, str) and value in aliases:
        return aliases[value]
    raise ctx.error(
        key, pos, f'must be true, false, "development" or "production", got {_describe(value)}'
    )


def _proxy_processes(value, ctx, key, pos):
    if value == "auto":
        return "auto"
    if not _is_int(value):
        raise ctx.error(key, pos, f'expected an integer or "auto", got {_describe(value)}')
    _check_range(int(value), 1, None, ctx, key, pos)
    return int(value)


def _scalar_text(value, ctx, key, pos) -> str:
    """Environment-ish values: numbers and booleans become the text users expect."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ctx.error(key, pos, f"expected a string, got {_describe(value)}")


def _str_list(numbers_ok: bool = False) -> Kind:
    item_kind = _str(numbers_ok=numbers_ok)

    def check(value, ctx, key, pos):
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ctx.error(key, pos, f"expected a list, got {_describe(value)}")
        return tuple(
            item_kind(item, ctx, f"{key}[{i}]", _item_pos(value, i, pos))
            for i, item in enumerate(value)
        )

    return check


def _str_map(value, ctx, key, pos):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.error(key, pos, f"expected a mapping, got {_describe(value)}")
    return {
        str(k): _scalar_text(v, ctx, f"{key}.{k}", _value_pos(value, k, pos))
        for k, v in value.items()
    }


_INI_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def _ini_map(value, ctx, key, pos):
    """php.ini settings: names php knows the shape of, values that fit on one INI line."""
    settings = _str_map(value, ctx, key, pos)
    for name, text in settings.items():
        where = _key_pos(value, name)
        if not _INI_NAME.match(name):
            raise ctx.error(
                f"{key}.{name}",
                where,
                "a php.ini setting name has only letters, digits, '_' and '.'",
            )
        if any(c in text for c in '"\r\n\0'):
            raise ctx.error(
                f"{key}.{name}",
                _value_pos(value, name, where),
                "the value must be one line without double quotes",
            )
    return settings


def _section(cls: type) -> Kind:
    def check(value, ctx, key, pos):
        node = _as_mapping(value, ctx, key, pos)
        return _build(cls, node, ctx, key + ".")

    return check


def _f(default: Any, kind: Kind, section: type | None = None):
    """An attrs field with its YAML kind; mutable defaults are copied per instance."""
    metadata = {"kind": kind, "section": section}
    if isinstance(default, dict):
        return attrs.field(factory=dict, metadata=metadata)
    if section is not None:
        return attrs.field(factory=section, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


def _sub(cls: type):
    return _f(None, _section(cls), section=cls)


def _positions():
    """Where each dotted key's value was written; not part of equality."""
    return attrs.field(factory=dict, eq=False, repr=False)


# Pairs (low, high) that must not cross, checked after a section is read.
# Filled in by the schemas (server.py, worker.py) next to their classes.
ORDER_CHECKS: dict[type, list[tuple[str, str]]] = {}


# ---------------------------------------------------------------------------
# The walker


class _Context:
    """Per-file state of one load: where we are, what we warned about."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.warnings: list[ConfigWarning] = []
        self.positions: dict[str, Position] = {}

    def error(self, key: str | None, pos: Position, message: str) -> ConfigError:
        return ConfigError(message, self.file, pos[0], pos[1], key)

    def warn(self, key: str, pos: Position, message: str) -> None:
        self.warnings.append(ConfigWarning(self.file, pos[0], pos[1], key, message))

    def sorted_warnings(self) -> list[ConfigWarning]:
        """In file order, whichever pass (aliases are read last) found them."""
        return sorted(self.warnings, key=lambda w: (w.line or 0, w.column or 0))


def _lc(node: Any, getter: str, index: Any, fallback: Position) -> Position:
    """1-based (line, column) from ruamel's line/column info, if it has any."""
    try:
        line, col = getattr(node.lc, getter)(index)
    except (AttributeError, KeyError, IndexError, TypeError):
        return fallback
    return line + 1, col + 1


def _key_pos(node: Any, key: Any) -> Position:
    return _lc(node, "key", key, (None, None))


def _value_pos(node: Any, key: Any, fallback: Position = (None, None)) -> Position:
    if node.get(key) is None:
        # ruamel places a null value at the next token; the key is more useful.
        return _lc(node, "key", key, fallback)
    return _lc(node, "value", key, fallback)


def _item_pos(node: Any, index: int, fallback: Position) -> Position:
    return _lc(node, "item", index, fallback)


def _fields(cls: type) -> dict[str, Any]:
    return {f.name: f for f in attrs.fields(cls) if "kind" in f.metadata}


def _as_mapping(value: Any, ctx: _Context, key: str, pos: Position) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.error(key, pos, f"expected a mapping, got {_describe(value)}")
    return value


def _suggest(cls: type, key: str, known: Iterable[str]) -> str | None:
    """A close spelling here, or the same key one section down (misplaced)."""
    close = difflib.get_close_matches(key, list(known), 1)
    if close:
        return close[0]
    for name, field in _fields(cls).items():
        section = field.metadata["section"]
        if section is not None and key in _fields(section):
            return f"{name}.{key}"
    return None


def _walk(
    cls: type,
    node: dict,
    ctx: _Context,
    prefix: str,
    ignore: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Convert the keys of `node` that `cls` knows; warn about the others.

    Returns only the keys present, so callers can merge aliases before building.
    """
    fields = _fields(cls)
    ignore = tuple(ignore)
    values: dict[str, Any] = {}
    for key, value in node.items():
        if only is not None:
            if key not in only:
                continue
        elif key in ignore:
            continue
        dotted = f"{prefix}{key}"
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            message = f"unknown key {str(key)!r}"
            hint = _suggest(cls, str(key), list(fields) + list(ignore))
            if hint:
                message += f"; did you mean {hint!r}?"
            ctx.warn(dotted, _key_pos(node, key), message)
            continue
        pos = _value_pos(node, key, _key_pos(node, key))
        ctx.positions[dotted] = pos
        values[key] = field.metadata["kind"](value, ctx, dotted, pos)
    return values


def _check_order(cls: type, values: dict[str, Any], ctx: _Context, prefix: str) -> None:
    fields = _fields(cls)
    for low, high in ORDER_CHECKS.get(cls, ()):
        lo = values.get(low, fields[low].default)
        hi = values.get(high, fields[high].default)
        if lo > hi:
            blame = low if low in values else high
            raise ctx.error(
                prefix + blame,
                ctx.positions.get(prefix + blame, (None, None)),
                f"{low} ({lo}) must not be greater than {high} ({hi})",
            )


def _build(cls: type, node: dict, ctx: _Context, prefix: str, **extra: Any) -> Any:
    values = _walk(cls, node, ctx, prefix)
    _check_order(cls, values, ctx, prefix)
    return cls(**values, **extra)


def _load(path: str) -> tuple[_Context, dict]:
    """Parse a YAML file into a (possibly empty) mapping, or raise ConfigError."""
    ctx = _Context(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("file not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", path) from None
    yaml = YAML(typ="rt")
    try:
        data = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = " ".join(p for p in (e.problem, e.context) if p) or "invalid YAML"
        if mark is None:
            raise ConfigError(message, path) from None
        raise ConfigError(message, path, mark.line + 1, mark.column + 1) from None
    except YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", path) from None
    if data is None:
        return ctx, {}
    if not isinstance(data, dict):
        start = YAML(typ="rt").compose(text).start_mark
        raise ConfigError(
            f"the top level must be a mapping, got {_describe(data)}",
            path,
            start.line + 1,
            start.column + 1,
        )
    return ctx, data


_SIZE_UNITS = {"": 1, "b": 1}
for _i, _letter in enumerate("kmgt", start=1):
    for _suffix in ("", "b", "i", "ib"):
        _SIZE_UNITS[_letter + _suffix] = 1024**_i
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """ "512MiB", "1G", "100M", "1024" -> bytes; "" -> 0.  Units are binary, like
    php.ini, nginx and the JVM ("1G" is 1024**3)."""
    if text is None or str(text).strip() == "":
        return 0
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}; use a number with an optional unit such as 512MiB, 1G or 100M"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
