"""The OOD-score head of a two-output model, found structurally so quantizers can keep it FP32."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence


def ood_head_nodes(graph_outputs: Sequence[Any], inputs_of: Callable[[Any], Iterable[Any]],
                   name_of: Callable[[Any], str]) -> list[str]:
    """Names of the nodes that compute only the OOD score of a two-output model.

    Those are the ancestors of the second output (``ood_score``) that are not ancestors of
    the first (``logits``): found structurally, because exporters name nodes differently
    from one model to the next. The OOD score subtracts nearly equal squared distances;
    8-bit activations would destroy it, and it costs little, so it stays FP32.

    Args:
        graph_outputs: the nodes producing ``logits`` and ``ood_score``, in that order.
        inputs_of: ``node -> nodes feeding it``.
        name_of: ``node -> name`` used by the quantizer's exclusion list.
    """
    def ancestors(start: Any) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        stack = [start]
        while stack:
            node = stack.pop()
            name = name_of(node)
            if name in seen:
                continue
            seen[name] = node
            stack.extend(inputs_of(node))
        return seen

    logits_side = ancestors(graph_outputs[0])
    return [name for name in ancestors(graph_outputs[1]) if name not in logits_side]


def onnx_ood_head_nodes(graph: Any) -> list[str]:
    """:func:`ood_head_nodes` for an ONNX graph (``[]`` for a single-output model).

    Args:
        graph: an ``onnx.GraphProto``.
    """
    if len(graph.output) < 2:
        return []
    producer = {out: node for node in graph.node for out in node.output}
    return ood_head_nodes(
        [producer[o.name] for o in graph.output[:2]],
        lambda node: [producer[i] for i in node.input if i in producer],
        lambda node: node.name,
    )


def openvino_ood_head_nodes(model: Any) -> list[str]:
    """:func:`ood_head_nodes` for an OpenVINO model (``[]`` for a single-output model).

    Args:
        model: an ``openvino.Model``.
    """
    if len(model.outputs) < 2:
        return []
    return [name for name in ood_head_nodes(
        [out.get_node() for out in model.outputs[:2]],
        lambda op: [i.get_source_output().get_node() for i in op.inputs()],
        lambda op: op.get_friendly_name(),
    )]
