"""``input.filter``: a row filter written as a small expression, built as a pyarrow expression.

    status == 'success'
    status == 'success' and width >= 64 and not caption is None
    source in ['laion', 'cc12m'] or is_valid(url)

The text is parsed with Python's ``ast`` (never compiled or evaluated) and only this grammar
is accepted: column names (bare, or ``col('odd name')``), literals (strings, numbers,
booleans, ``None``), lists of literals, comparisons (``== != < <= > >= in not in``, ``is
None``, ``is not None``), ``and`` / ``or`` / ``not`` (also ``& | ~``) and the functions
``is_null(x)`` / ``is_valid(x)``. Anything else (attributes, other calls, arithmetic,
subscripts) is refused with one line naming it. Non-goals: computed columns.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

_COMPARE: dict[type, Callable] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_FUNCTIONS = {"is_null": pc.Expression.is_null, "is_valid": pc.Expression.is_valid}


MAX_DEPTH = 64  # nesting levels a filter may have (a deeper one is refused, not recursed)


class FilterError(ValueError):
    """A filter outside the grammar; the message names the part that is not allowed."""


def parse_filter(text: str) -> pc.Expression:
    """The pyarrow expression of a filter text; raises FilterError."""
    tree = _parse(text)
    try:
        expr = _build(tree.body)
    except (TypeError, pa.ArrowException) as exc:  # e.g. a comparison pyarrow cannot build
        raise FilterError(f"not a valid condition: {text!r} ({exc})") from None
    if not isinstance(expr, pc.Expression):
        raise FilterError(f"{text!r} is a constant, not a condition on columns")
    return expr


def _parse(text: str) -> ast.Expression:
    """The syntax tree of a filter, at most `MAX_DEPTH` levels deep; raises FilterError."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise FilterError(f"not a filter expression: {text!r} ({exc.msg})") from None
    except (RecursionError, MemoryError):  # the parser's own depth limit
        raise FilterError(f"input.filter nests too deeply (over {MAX_DEPTH} levels)") from None
    if _depth(tree.body) > MAX_DEPTH:
        raise FilterError(f"input.filter nests too deeply (over {MAX_DEPTH} levels)")
    return tree


def _depth(root: ast.AST) -> int:
    """Nesting depth of a syntax tree, walked without recursion."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def filter_columns(text: str) -> list[str]:
    """The columns a filter reads, in order of appearance."""
    tree = _parse(text)
    functions = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    names: list[str] = []
    for node in ast.walk(tree):
        name = None if id(node) in functions else _column_name(node)
        if name is not None and name not in names:
            names.append(name)
    return names


def apply_filter(table: pa.Table, text: str | None) -> pa.Table:
    """The rows of ``table`` the filter keeps (all of them without a filter)."""
    return table if not text else table.filter(parse_filter(text))


def _column_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name) and node.id not in ("True", "False", "None"):
        return node.id
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "col"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value
    return None


def _build(node: ast.AST) -> object:
    name = _column_name(node)
    if name is not None:
        return pc.field(name)
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float | bool | None):
        return node.value
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.BoolOp):
        join = operator.and_ if isinstance(node.op, ast.And) else operator.or_
        parts = [_condition(v) for v in node.values]
        out = parts[0]
        for part in parts[1:]:
            out = join(out, part)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.Invert):
        return ~_condition(node.operand)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_number(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd | ast.BitOr):
        join = operator.and_ if isinstance(node.op, ast.BitAnd) else operator.or_
        return join(_condition(node.left), _condition(node.right))
    if isinstance(node, ast.Compare):
        return _compare(node)
    if _is_function_call(node):
        return _FUNCTIONS[node.func.id](_column(node.args[0]))
    raise FilterError(f"not allowed in input.filter: {ast.unparse(node)!r}")


def _is_function_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and len(node.args) == 1
        and not node.keywords
    )


def _compare(node: ast.Compare) -> pc.Expression:
    out = None
    left = node.left
    for op, right in zip(node.ops, node.comparators, strict=True):
        part = _compare_one(left, op, right)
        out = part if out is None else out & part
        left = right
    return out


def _compare_one(left: ast.AST, op: ast.cmpop, right: ast.AST) -> pc.Expression:
    if isinstance(op, ast.Is | ast.IsNot):
        if not (isinstance(right, ast.Constant) and right.value is None):
            raise FilterError("'is' / 'is not' compare with None only")
        test = _column(left).is_null()
        return test if isinstance(op, ast.Is) else ~test
    if isinstance(op, ast.In | ast.NotIn):
        values = _build(right)
        if not isinstance(values, list):
            raise FilterError(f"'in' needs a list of values, got {ast.unparse(right)!r}")
        test = _column(left).isin(values)
        return test if isinstance(op, ast.In) else ~test
    a, b = _build(left), _build(right)
    if not isinstance(a, pc.Expression) and not isinstance(b, pc.Expression):
        raise FilterError(f"a comparison needs a column: {ast.unparse(left)!r}")
    if any(isinstance(v, list) or v is None for v in (a, b)):
        raise FilterError(
            "compare with a single value ('in' takes a list, 'is None' tests for null): "
            f"{ast.unparse(left)!r} against {ast.unparse(right)!r}"
        )
    if not isinstance(a, pc.Expression):
        a = pc.scalar(a)
    return _COMPARE[type(op)](a, b)


def _column(node: ast.AST) -> pc.Expression:
    name = _column_name(node)
    if name is None:
        raise FilterError(f"expected a column name, got {ast.unparse(node)!r}")
    return pc.field(name)


def _condition(node: ast.AST) -> pc.Expression:
    out = _build(node)
    if not isinstance(out, pc.Expression):
        raise FilterError(f"expected a condition, got {ast.unparse(node)!r}")
    return out


def _literal(node: ast.AST) -> object:
    out = _build(node)
    if isinstance(out, pc.Expression | list):
        raise FilterError(f"expected a literal value, got {ast.unparse(node)!r}")
    return out


def _number(node: ast.AST) -> int | float:
    out = _literal(node)
    if isinstance(out, bool) or not isinstance(out, int | float):
        raise FilterError(f"'-' needs a number, got {ast.unparse(node)!r}")
    return out
