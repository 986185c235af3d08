"""docs/fot.md against the code: its cross-batch figure is drawn from `cross_batch_contexts`, and every function it
links in longllama.py or topk.py exists there."""

import re

import pytest

import longllama
import topk
from conftest import ROOT

PAGE = ROOT / "docs" / "fot.md"
MODULES = {"longllama": longllama, "topk": topk}

# The figure's two grids: a batch of 8 rows, packing k = 4, cross_batch_range d = 3.
FIGURE = dict(batch_size=8, cross_batch_range=3, packing=4)

# Names the page must mention, each of which must be defined in its module (a method as Class.method).
NAMES = {
    "longllama": ["plain_attention", "memory_layer_attention", "attention_and_lse", "merge_attention",
                  "grouped_attention", "LongLlamaConfig.mem_attention_grouping", "Keys", "Attention.forward",
                  "MemoryCache", "MemoryCache.append", "LocalCache", "LongLlama.forward", "LongLlama._read",
                  "LongLlama._window", "LongLlama._layers", "LongLlama.make_local_room",
                  "LongLlama.attention_kernel", "LongLlama._evict", "cross_batch_attention",
                  "cross_batch_contexts", "training_attention", "causal_visible", "apply_rope", "logn_scale",
                  "LongLlama.mem_query_scale"],
    "topk": ["TopkMemory", "TopkMemory.seen_by", "TopkMemory.choose_blocks", "TopkMemory.select_blocks",
             "topk_visible", "probe_positions"],
}


def draw_grid(batch_size: int, cross_batch_range: int, stepping: bool, packing: int) -> str:
    """Which batch elements each element's memory-layer queries see, by `cross_batch_contexts`: X its own keys,
    + an earlier element of its pack (an earlier piece of its document), - an element of another pack (another
    document), . not seen."""
    contexts = longllama.cross_batch_contexts(batch_size, cross_batch_range, stepping, packing).tolist()
    labels = [f"{b} (pack {b // packing}, row {b % packing})" for b in range(batch_size)]
    width = max(len(label) for label in labels) + 3
    lines = [f"d={cross_batch_range}, k={packing}, {'with' if stepping else 'without'} stepping",
             " " * width + "keys of element",
             "query element".ljust(width) + " ".join(str(b) for b in range(batch_size)) + "   contexts"]
    for b in range(batch_size):
        seen = {b - j for j in range(contexts[b])}
        marks = ["X" if a == b else "." if a not in seen else "+" if a // packing == b // packing else "-"
                 for a in range(batch_size)]
        lines.append(labels[b].ljust(width) + " ".join(marks) + f"   {contexts[b]}")
    return "\n".join(lines)


def figure_grids() -> list:
    return [draw_grid(FIGURE["batch_size"], FIGURE["cross_batch_range"], stepping, FIGURE["packing"])
            for stepping in (False, True)]


def fenced_blocks(text: str) -> list:
    return [block.strip("\n") for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)]


def test_figure_is_drawn_from_cross_batch_contexts():
    blocks = fenced_blocks(PAGE.read_text())
    for grid in figure_grids():
        assert grid in blocks, f"docs/fot.md lacks this grid, as cross_batch_contexts draws it now:\n{grid}"


def test_grid_marks_follow_the_rule():
    """The drawing itself, on a case worked by hand: d = 3, k = 4, stepping: contexts 1 3 4 4 1 3 4 4."""
    grid = draw_grid(8, 3, True, 4).splitlines()
    assert grid[3].endswith("X . . . . . . .   1")  # element 0 sees itself only
    assert grid[4].endswith("+ X . . . . . .   2")  # element 1: 3 contexts, but nothing below index 0
    assert grid[7].endswith(". . . . X . . .   1")  # element 4, the first of pack 1: itself only
    assert grid[8].endswith(". . . - + X . .   3")  # element 5: its own pack's 4, pack 0's last element


def page_links() -> list:
    """(module, name) of every [`name`](../module.py) link on the page."""
    return re.findall(r"\[`([\w.]+)`\]\(\.\./(longllama|topk)\.py\)", PAGE.read_text())


def defined(module, name: str) -> bool:
    owner = module
    for part in name.split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
    return True


@pytest.mark.parametrize("module_name", sorted(NAMES))
def test_named_functions_exist_and_are_on_the_page(module_name):
    text, module = PAGE.read_text(), MODULES[module_name]
    missing = [name for name in NAMES[module_name] if not defined(module, name)]
    assert not missing, f"{module_name}.py no longer defines {missing}"
    unmentioned = [name for name in NAMES[module_name] if f"`{name}`" not in text]
    assert not unmentioned, f"docs/fot.md does not mention {unmentioned}"


def test_every_linked_name_is_defined():
    links = page_links()
    assert len(links) >= 20, "docs/fot.md should link its functions as [`name`](../longllama.py)"
    missing = [f"{module}.py: {name}" for name, module in links if not defined(MODULES[module], name)]
    assert not missing, f"docs/fot.md links names that are not defined: {missing}"
