"""The frozen backbone as an ONNX graph: torch.export traces its first two blocks, the rest repeat the second.

torch.export traces every operation of every block through Python: SmolLM2's 30 blocks took 21 s on a
2-core AVX-512 BF16 CPU and 83 s of a 95-103 s server load on a 2-core AVX-512 CPU without bfloat16 units
(docs/benchmarks.md, "The export traces two blocks"). The blocks of a backbone are one graph with other
weights, so only the first two are traced: the first is fed by the embeddings, the second by a block,
as every later one is. The second block's nodes (told apart by the name scope torch.export records on
each node) are then copied once for each further block, fed by the block before, with that block's
weights; what the traced graph did after the second block (the final norm, the stack of inner states)
takes the last block's output instead. Where the blocks differ in anything but their weights (adapters
on the last blocks, per-layer attention types), or the traced graph has another shape than this
expects, the whole backbone is traced as before. OnnxBackbone checks the result against PyTorch.

Rewrites make the graph cheaper to run at a prompt's few rows: RMS norms, rotary embeddings and the
attention on unsplit heads are traced as ONNX's one operator each (operators_of_onnx), and the products
of one value by several weights (a block's query, key and value; its gate and up) are joined into one
(fuse_sibling_products).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import re
import sys
import threading
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from model.backbone import ExportedBackbone, decoder_layers, set_layer_count

OPSET = 23  # the first with Attention as one operator (and onnxruntime>=1.23, pyproject.toml)
TRACED_BLOCKS = 2  # the first block is fed by the embeddings; the second is the one every later block repeats
SCOPES = "pkg.torch.onnx.name_scopes"  # where torch.export's exporter records each node's module path
INNER_STATES = "inner_states"  # ExportedBackbone's second output with every_layer
ROTATION = "apply_rotary_pos_emb"  # what Hugging Face's modeling modules call their rotary embedding
JOINED = "+"  # between the names of weights joined side by side (JoinedWeights)
# One export at a time: each replaces a modeling module's rotation while it traces (rotations_as_one_operator).
EXPORTING = threading.Lock()


def export_backbone(backbone: nn.Module, every_layer: bool, path: Path, repeat_blocks: bool = True) -> bool:
    """Write the backbone's graph (embeddings and mask in; ExportedBackbone's outputs) to path, its weights
    in files beside it. True where the later blocks were repeated rather than traced."""
    blocks = decoder_layers(backbone)
    exported = ExportedBackbone(backbone, every_layer)
    weights = JoinedWeights(dict(exported.named_parameters()) | dict(exported.named_buffers()))
    joined_data = path.parent / "joined_products.data"
    repeated = repeat_blocks and len(blocks) > TRACED_BLOCKS and blocks_alike(backbone, blocks)
    if repeated:
        trace(first_blocks(backbone, TRACED_BLOCKS), every_layer, path)
        graph = onnx.load(str(path), load_external_data=False)
        # Joined before the blocks are repeated, so the later blocks' weights are written once, joined.
        fuse_sibling_products(graph, weights, joined_data)
        scope = f"base_model.{module_path(backbone.base_model, blocks)}"
        repeated = repeat_last_block(graph, scope, len(blocks), weights, every_layer,
                                     path.parent / "repeated_blocks.data")
    if not repeated:
        trace(backbone, every_layer, path)
        graph = onnx.load(str(path), load_external_data=False)
        fuse_sibling_products(graph, weights, joined_data)
    onnx.save(graph, str(path))
    return repeated


def trace(backbone: nn.Module, every_layer: bool, path: Path) -> None:
    hidden = backbone.get_input_embeddings().embedding_dim
    # Traced on a padded batch of two, so the graph keeps the general masked path (an all-ones mask
    # could let the attention take its unmasked shortcut).
    embeds = torch.zeros(2, 5, hidden)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    outputs = ["last_hidden_state", INNER_STATES] if every_layer else ["last_hidden_state"]
    sizes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")}
    with EXPORTING, warnings.catch_warnings(), torch.no_grad(), operators_of_onnx(backbone):
        warnings.simplefilter("ignore")  # the exporter's notes on what it specialises
        # optimize=False: onnxscript's own pass over the graph took 15 s more at 30 layers and left ONNX
        # Runtime's optimised graph no faster.
        torch.onnx.export(ExportedBackbone(backbone, every_layer).eval(), (embeds, mask), str(path),
                          input_names=["inputs_embeds", "attention_mask"], output_names=outputs,
                          dynamic_shapes={"inputs_embeds": sizes, "attention_mask": sizes},
                          opset_version=OPSET, dynamo=True, optimize=False, verbose=False)


@contextlib.contextmanager
def operators_of_onnx(backbone: nn.Module) -> Iterator[None]:
    """Trace the backbone's RMS norms and rotary embeddings as the one ONNX operator each has
    (RMSNormalization, RotaryEmbedding). Hugging Face writes them out (a norm as square, mean, add, square
    root, reciprocal and two products; a rotation as slices, a negation, a concatenation, products and a
    sum), which ONNX Runtime's fusions do not recognise, and each node pays its dispatch: one operator
    each made SmolLM2's 30-layer batch-1 pass 4% (norms) and 4% (rotations) faster, and the attention
    with its heads unsplit another 4% (docs/benchmarks.md). Only what computes exactly what it replaces
    on random inputs is replaced; the graph as a whole is checked against PyTorch after (OnnxBackbone)."""
    with norms_as_one_operator(backbone), rotations_as_one_operator(backbone), attention_unsplit(backbone):
        yield


def norms_as_one_operator(backbone: nn.Module) -> contextlib.AbstractContextManager:
    """The norms that compute torch's rms_norm (not, say, Gemma's, which scales by 1 + weight) run it while
    traced, which the exporter writes as RMSNormalization."""
    return forwards_replaced([module for module in backbone.modules() if computes_rms_norm(module)], rms_norm_forward)


@contextlib.contextmanager
def forwards_replaced(modules: list[nn.Module], forward: Callable) -> Iterator[None]:
    """Each module runs `forward` (called with the module first) instead of its own, until the block ends."""
    for module in modules:
        module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def computes_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    epsilon = rms_norm_epsilon(module)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 1 or epsilon is None:
        return False
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, weight.numel(), generator=generator).to(weight)
    try:
        with torch.no_grad():
            return torch.allclose(module(probe), rms_norm_forward(module, probe), rtol=1e-5, atol=1e-6)
    except Exception:  # another forward than a norm's of one tensor
        return False


def rms_norm_epsilon(module: nn.Module) -> float | None:
    epsilon = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return epsilon if isinstance(epsilon, float) else None


def rms_norm_forward(module: nn.Module, states: torch.Tensor) -> torch.Tensor:
    return nn.functional.rms_norm(states, (states.shape[-1],), module.weight, rms_norm_epsilon(module))


@contextlib.contextmanager
def rotations_as_one_operator(backbone: nn.Module) -> Iterator[None]:
    """Hugging Face's modeling modules each define apply_rotary_pos_emb, which their attention calls by
    name: where it computes RotaryEmbedding's rotation, the modules of the backbone's layers call
    rotary_embedding instead while traced. That name is global to the module, so a PyTorch pass of the
    same model family elsewhere (a model serving while another is exported) calls it meanwhile too, with
    the same result in float32 and bfloat16 (the check below, and a test; exports take EXPORTING one at a
    time)."""
    modeling = {sys.modules[type(module).__module__] for module in backbone.modules()}
    replaced = [(namespace, getattr(namespace, ROTATION)) for namespace in modeling
                if callable(getattr(namespace, ROTATION, None)) and rotates_as_onnx(getattr(namespace, ROTATION))]
    for namespace, original in replaced:
        setattr(namespace, ROTATION, functools.partial(rotary_embedding, original))
    try:
        yield
    finally:
        for namespace, original in replaced:
            setattr(namespace, ROTATION, original)


def rotary_embedding(original: Callable, queries: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb through ONNX's RotaryEmbedding: queries and keys (batch, heads, tokens, head
    size), cos and sin (batch, tokens, rotated size) with their two halves alike, as Hugging Face's rotary
    modules make them. Any other call (another layout) goes to the original."""
    if args or kwargs or queries.dim() != 4 or cos.dim() != 3:
        return original(queries, keys, cos, sin, *args, **kwargs)
    return tuple(rotated(states, cos, sin, queries.shape[-1]) for states in (queries, keys))


def rotated(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int,
            heads: int = 0) -> torch.Tensor:
    """States through ONNX's RotaryEmbedding: (batch, heads, tokens, head size), or (batch, tokens, heads x
    head size) given heads; cos and sin (batch or 1, tokens, rotated size) with their two halves alike."""
    half = cos.shape[-1] // 2
    partial = cos.shape[-1] if cos.shape[-1] < head_size else 0
    # One row of positions serves the batch in Hugging Face's rotary modules; the operator wants one per prompt.
    cos, sin = (table[..., :half].expand(states.shape[0], -1, -1) for table in (cos, sin))
    return torch.onnx.ops.rotary_embedding(states, cos, sin, num_heads=heads, rotary_embedding_dim=partial)


def attention_unsplit(backbone: nn.Module) -> contextlib.AbstractContextManager:
    """Attention modules with their own query, key, value and output projections (Llama's, Qwen2's,
    Mistral's) are traced as attention_of_onnx: ONNX's RotaryEmbedding and Attention take the heads as
    attributes, so the states stay (batch, tokens, heads x head size), without the reshapes and
    transposes of each head's split. Kept only where the backbone then computes what it computed before
    on a padded batch of random embeddings (not, say, Qwen3's, whose heads are normed after the split)."""
    modules = [module for module in backbone.modules() if has_own_projections(module)]
    return forwards_replaced(modules if modules and attention_alike(backbone, modules) else [], attention_of_onnx)


def attention_alike(backbone: nn.Module, modules: list[nn.Module]) -> bool:
    """Whether the backbone's states stay (to 1e-5 of each vector's length) with attention_of_onnx in modules."""
    before = probe_states(backbone)
    try:
        with forwards_replaced(modules, attention_of_onnx):
            after = probe_states(backbone)
    except Exception:  # a layer that calls its attention otherwise
        return False
    return relative_error(after, before) <= 1e-5


def has_own_projections(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    return (all(isinstance(getattr(module, name, None), nn.Linear) for name in projections)
            and isinstance(getattr(module, "head_dim", None), int)
            and isinstance(getattr(module, "scaling", None), float)
            and all(isinstance(getattr(config, name, None), int)
                    for name in ("num_attention_heads", "num_key_value_heads")))


def attention_of_onnx(module: nn.Module, hidden_states: torch.Tensor, position_embeddings=None,
                      attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """A Hugging Face attention's forward pass with RotaryEmbedding and Attention on unsplit heads."""
    heads, kv_heads = module.config.num_attention_heads, module.config.num_key_value_heads
    cos, sin = position_embeddings
    queries = rotated(module.q_proj(hidden_states), cos, sin, module.head_dim, heads)
    keys = rotated(module.k_proj(hidden_states), cos, sin, module.head_dim, kv_heads)
    values = module.v_proj(hidden_states)
    attended = torch.onnx.ops.attention(queries, keys, values, attention_mask, is_causal=attention_mask is None,
                                        q_num_heads=heads, kv_num_heads=kv_heads, scale=module.scaling)[0]
    return module.o_proj(attended), None


def probe_states(backbone: nn.Module) -> torch.Tensor:
    """The last states at the real positions of probe_batch."""
    embeds, mask = probe_batch(backbone)
    with torch.no_grad():
        states = backbone.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    return states[mask.bool()]


def probe_batch(backbone: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of random embeddings at the scale of the backbone's own, and its mask: what a rewrite
    and the exported graph are checked on."""
    embeddings = backbone.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    scale = embeddings.weight[:1024].std().item()  # of some rows: the whole table's would take its size again
    embeds = torch.randn(2, 7, embeddings.embedding_dim, generator=generator) * scale
    return embeds, torch.tensor([[1] * 7, [1] * 4 + [0] * 3])


def relative_error(states: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest distance of a state vector from its reference, relative to the reference's length."""
    lengths = reference.norm(dim=-1).clamp_min(torch.finfo(reference.dtype).tiny)
    return ((states - reference).norm(dim=-1) / lengths).max().item()


def rotates_as_onnx(function: Callable) -> bool:
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(2, 4, 5, 8, generator=generator), torch.randn(2, 2, 5, 8, generator=generator)
    angles = torch.randn(2, 5, 4, generator=generator).repeat(1, 1, 2)
    try:
        with torch.no_grad():
            expected = function(queries, keys, angles.cos(), angles.sin())
            mine = rotary_embedding(function, queries, keys, angles.cos(), angles.sin())
        return all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(expected, mine, strict=True))
    except Exception:  # another signature: not Hugging Face's rotation
        return False


def blocks_alike(backbone: nn.Module, blocks: nn.ModuleList) -> bool:
    """Whether every block after the first could be the second with other weights: the same modules,
    parameter shapes and settings (layer_idx aside: it only indexes a cache), the same layer type."""
    layer_types = getattr(backbone.config, "layer_types", None)
    if isinstance(layer_types, list) and len(set(layer_types[1:])) > 1:
        return False
    template = block_signature(blocks[1])
    return all(block_signature(block) == template for block in blocks[2:])


def block_signature(block: nn.Module) -> list:
    settings = (bool, int, float, str, type(None))
    return [(path, type(module).__name__,
             sorted((k, v) for k, v in vars(module).items() if isinstance(v, settings) and k != "layer_idx"),
             [(name, tuple(p.shape), p.dtype) for name, p in module.named_parameters(recurse=False)])
            for path, module in block.named_modules()]


def first_blocks(backbone: nn.Module, n: int) -> nn.Module:
    """The causal LM with only its first n blocks, the model left as it is: the same embeddings and norm, copies
    of the blocks (a pass of a view that shared them would install Hugging Face's output hooks on them a second
    time, and the model's own hidden_states would then hold some blocks' outputs twice)."""
    base = copy.copy(backbone.base_model)
    base._modules = dict(base._modules)
    base.config = copy.deepcopy(base.config)
    blocks = decoder_layers(backbone)
    setattr(base, module_path(backbone.base_model, blocks), copy.deepcopy(nn.ModuleList(list(blocks)[:n])))
    set_layer_count(base.config, n)
    view = copy.copy(backbone)
    view._modules = dict(backbone._modules)
    view.config = base.config
    setattr(view, backbone.base_model_prefix, base)
    return view


def module_path(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


def block_of(node: onnx.NodeProto, scope: str) -> int | None:
    """The index of the block a node was traced in (its name scopes hold "<scope>.<index>"), or None."""
    pattern = re.compile(re.escape(scope) + r"\.(\d+)")
    for prop in node.metadata_props:
        if prop.key == SCOPES:
            for name in ast.literal_eval(prop.value):
                if match := pattern.fullmatch(name):
                    return int(match[1])
    return None


def repeat_last_block(graph: onnx.ModelProto, scope: str, n_blocks: int, weights: dict[str, torch.Tensor],
                      every_layer: bool, data_file: Path) -> bool:
    """Extend a graph traced with two blocks to n_blocks (in place; the new weights written to data_file).
    False, the graph untouched, where its shape is not the one expected: one value carried from block
    to block, the second block's weights named "<scope>.1.*", no subgraphs in the block."""
    nodes = list(graph.graph.node)
    block = [block_of(node, scope) for node in nodes]
    first = [node for node, index in zip(nodes, block) if index == 0]
    last = [node for node, index in zip(nodes, block) if index == 1]
    made_last = {value for node in last for value in node.output}
    fed_last = {value for node in last for value in node.input if value} - made_last
    # The exporter reuses a constant made in the first block in the second: shared, not carried.
    carried_in = fed_last & {value for node in first if node.op_type != "Constant" for value in node.output}
    others = [node for node, index in zip(nodes, block) if index != 1]
    read_after = {value for node in others for value in node.input} | {v.name for v in graph.graph.output}
    carried_out = made_last & read_after
    initializers = {tensor.name for tensor in graph.graph.initializer}
    own_weights = {name for name in fed_last & initializers if name.startswith(f"{scope}.1.")}
    later_weights = {of_block(name, scope, i) for i in range(2, n_blocks) for name in own_weights}
    nested = any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                 for node in last for attribute in node.attribute)  # subgraphs would need renaming too
    if nested or not (first and last and len(carried_in) == 1 and len(carried_out) == 1 and own_weights
                      and all(name in weights for name in later_weights)
                      and carried_out.isdisjoint(v.name for v in graph.graph.output)):
        return False
    (block_input,), (block_output,) = carried_in, carried_out
    outputs = [block_input, block_output]  # each block's output, block by block
    copies, offset = [], 0
    with open(data_file, "wb") as data:
        for index in range(2, n_blocks):
            names = {value: f"{value}/{scope}.{index}" for value in made_last}
            names[block_input] = outputs[-1]
            for name in own_weights:
                names[name] = of_block(name, scope, index)
                tensor = numpy_helper.from_array(weights[names[name]].detach().float().numpy(), names[name])
                offset = write_external(tensor, data, data_file.name, offset)
                graph.graph.initializer.append(tensor)
            for node in last:
                node_copy = copy.deepcopy(node)
                node_copy.name = f"{node.name}/{scope}.{index}"
                node_copy.input[:] = [names.get(value, value) for value in node.input]
                node_copy.output[:] = [names[value] for value in node.output]
                copies.append(node_copy)
            outputs.append(names[block_output])
    for node in others:  # what read the second block's output reads the last block's
        node.input[:] = [outputs[-1] if value == block_output else value for value in node.input]
    at = max(i for i, index in enumerate(block) if index == 1) + 1  # the copies follow the traced block
    ordered = nodes[:at] + copies + nodes[at:]
    if every_layer:  # the inner blocks' outputs, stacked: all but the last block's
        ordered += stacked(outputs[:-1], graph.graph.initializer)
        for node in ordered[:-1]:
            node.output[:] = [f"{value}/traced" if value == INNER_STATES else value for value in node.output]
    del graph.graph.node[:]
    graph.graph.node.extend(without_unread(ordered, {v.name for v in graph.graph.output}))
    return True


def of_block(name: str, scope: str, index: int) -> str:
    """The name of the second block's weight `name` in block `index` (of each of its parts, where joined)."""
    return name.replace(f"{scope}.1.", f"{scope}.{index}.")


def write_external(tensor: onnx.TensorProto, data, location: str, offset: int) -> int:
    """Move a tensor's bytes to the open data file, leaving a reference in the graph; returns the next offset."""
    raw = tensor.raw_data
    data.write(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        tensor.external_data.add(key=key, value=value)
    return offset + len(raw)


class JoinedWeights(dict):
    """The model's weights by name, and, named "<first>+<second>+...", those weights side by side as a
    joined product multiplies by them (each transposed to input by output). Joined weights are made when
    asked for: a block's are in memory only while they are written."""

    def __missing__(self, name: str) -> torch.Tensor:
        parts = name.split(JOINED)
        if len(parts) < 2 or not all(dict.__contains__(self, part) for part in parts):
            raise KeyError(name)
        return torch.cat([self[part].detach().float().t() for part in parts], dim=1).contiguous()

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and JOINED in name and all(
            dict.__contains__(self, part) for part in name.split(JOINED)))


def fuse_sibling_products(graph: onnx.ModelProto, weights: JoinedWeights, data_file: Path) -> None:
    """Products of one value by several of the model's weights (a block's query, key and value; its gate
    and up) as one product by those weights side by side, split after it (in place; the joined weights
    written to data_file, under their JoinedWeights names, so that repeat_last_block finds each later
    block's). Fewer, wider products: at a prompt's few rows a CPU runs them closer to its peak, and each
    product pays its dispatch once (at SmolLM2's 30 layers the batch-1 pass 7% faster, docs/benchmarks.md)."""
    nodes = list(graph.graph.node)
    made_by = {value: node for node in nodes for value in node.output}

    def weight_name(product: onnx.NodeProto) -> str | None:
        """The weight a MatMul multiplies by, as the exporter writes a linear layer: a transposed initializer."""
        source = made_by.get(product.input[1])
        if source is None or source.op_type != "Transpose" or source.input[0] not in weights:
            return None
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None)
        return source.input[0] if weights[source.input[0]].dim() == 2 and perm in ([1, 0], None) else None

    siblings: dict[str, list[tuple[onnx.NodeProto, str]]] = defaultdict(list)  # value -> (product, weight name)
    for node in nodes:
        if node.op_type == "MatMul" and (weight := weight_name(node)) is not None:
            siblings[node.input[0]].append((node, weight))
    joined: dict[int, list[onnx.NodeProto]] = {}  # the first product of a group -> its replacement
    initializers = {tensor.name for tensor in graph.graph.initializer}
    offset = 0
    with open(data_file, "wb") as data:
        for value, group in siblings.items():
            if len(group) < 2:
                continue
            products, parts = zip(*group)
            name = JOINED.join(parts)
            tensor = numpy_helper.from_array(weights[name].numpy(), name)
            offset = write_external(tensor, data, data_file.name, offset)
            graph.graph.initializer.append(tensor)
            widths = [weights[part].shape[0] for part in parts]
            widths_name = f"joined_widths/{'_'.join(map(str, widths))}"  # shared by every block alike
            if widths_name not in initializers:
                graph.graph.initializer.append(numpy_helper.from_array(torch.tensor(widths).numpy(), widths_name))
                initializers.add(widths_name)
            replacement = [
                helper.make_node("MatMul", [value, name], [f"{name}/product"], name=name),
                helper.make_node("Split", [f"{name}/product", widths_name], [p.output[0] for p in products],
                                 axis=-1, name=f"{name}/split")]
            for node in replacement:  # in the block of the products it replaces (block_of)
                node.metadata_props.extend(products[0].metadata_props)
            joined[id(products[0])] = replacement
            joined.update({id(product): [] for product in products[1:]})
    if not joined:
        return
    ordered = [new for node in nodes for new in joined.get(id(node), [node])]
    del graph.graph.node[:]
    graph.graph.node.extend(without_unread(ordered, {v.name for v in graph.graph.output}))
    read = {value for node in graph.graph.node for value in node.input}
    kept = [tensor for tensor in graph.graph.initializer if tensor.name in read]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)


def stacked(values: list[str], initializers) -> list[onnx.NodeProto]:
    """Nodes that stack the values along a new first axis into INNER_STATES."""
    axes = f"{INNER_STATES}/axes"
    initializers.append(numpy_helper.from_array(torch.tensor([0]).numpy(), axes))
    unsqueezed = [helper.make_node("Unsqueeze", [value, axes], [f"{value}/unsqueezed"]) for value in values]
    return unsqueezed + [helper.make_node("Concat", [node.output[0] for node in unsqueezed], [INNER_STATES], axis=0)]


def without_unread(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes that the graph's outputs depend on, in their order."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(value for value in node.input if value)
    return kept[::-1]
