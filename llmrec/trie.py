"""One prefix trie of integer sequences (semantic-ID code tuples, title token ids), as flat numpy arrays.

Constrained beam search (`llmrec.decoding`) walks it edge by edge towards items; zero-shot scoring
(`llmrec.zeroshot`) runs its nodes through an LM with tree attention. Both need the same structure, so
it is built once here, vectorised: a million-item index costs a few arrays, never a Python object per
node. Nodes are numbered in depth-first preorder with children in increasing token order, which is the
order of the sequences sorted lexicographically (a prefix before its extensions): node ``n``'s subtree
is the contiguous range ``n .. end[n] - 1``, and the children of a node are sorted by token.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

PAD = -1


class Trie:
    """Prefix tree of ``sequences``: a padded int array ``(n, max_len)`` (``-1`` only at a row's end) or
    a list of int sequences. Identical sequences share their last node; ``unique=True`` refuses them
    (an item index whose tuples collide cannot name an item from its codes).

    Node 0 is the root (empty prefix). Per node ``n``: ``token[n]`` (root -1), ``parent[n]`` (root -1),
    ``depth[n]`` (root 0), ``end[n]`` (one past its subtree: ``a`` is an ancestor-or-self of ``n`` iff
    ``a <= n < end[a]``), ``n_children[n]``, ``node_item[n]`` (the lowest sequence ending there, or -1).
    Children of ``n`` are ``child_nodes[child_ptr[n]:child_ptr[n + 1]]`` (sorted by token). Per sequence
    ``i``: ``nodes[i, k]`` is the node of its prefix of length ``k + 1`` (-1 past its end) and
    ``terminal[i]`` the node where it ends.
    """

    def __init__(self, sequences: np.ndarray | Sequence[Sequence[int]], unique: bool = False) -> None:
        codes = _padded(sequences)
        valid = codes >= 0
        n, width = codes.shape
        if n == 0:
            raise ValueError("Trie: no sequences")
        empty = np.flatnonzero(~valid[:, 0])
        if len(empty):
            raise ValueError(f"Trie: sequence {empty[0]} is empty")
        gap = np.argwhere(valid[:, 1:] & ~valid[:, :-1])
        if len(gap):
            raise ValueError(f"Trie: sequence {gap[0, 0]} has -1 padding before its end")
        # Sorted rows: a node is new where a row leaves the prefix it shares with the row above.
        order = np.lexsort(codes.T[::-1])
        rows = codes[order]
        shared = np.zeros_like(valid)
        shared[1:] = np.logical_and.accumulate(rows[1:] == rows[:-1], axis=1)
        new = valid[order] & ~shared
        ids = np.cumsum(new.ravel()).reshape(new.shape)  # row-major over sorted rows = preorder
        last = np.maximum.accumulate(np.where(new, np.arange(n)[:, None], 0), axis=0)
        sorted_nodes = np.where(valid[order], ids[last, np.arange(width)], PAD)
        at_row, at_depth = np.nonzero(new)
        up = np.where(at_depth > 0, sorted_nodes[at_row, np.maximum(at_depth - 1, 0)], 0)
        self.token = np.concatenate([[PAD], rows[new]]).astype(np.int64)
        self.parent = np.concatenate([[PAD], up]).astype(np.int64)
        self.depth = np.concatenate([[0], at_depth + 1]).astype(np.int64)
        self.nodes = np.empty_like(sorted_nodes)
        self.nodes[order] = sorted_nodes
        self.terminal = self.nodes[np.arange(n), valid.sum(1) - 1]
        self.n_children = np.bincount(self.parent[1:], minlength=len(self.token))
        self.child_ptr = np.concatenate([[0], np.cumsum(self.n_children)])
        self.child_nodes = np.argsort(self.parent[1:], kind="stable") + 1
        self.end = np.arange(len(self.token)) + self.subtree_sums(np.ones(len(self.token))).astype(np.int64)
        ends, first = np.unique(self.terminal, return_index=True)
        if unique and len(ends) < n:
            by_node = np.argsort(self.terminal, kind="stable")
            dup = np.flatnonzero(self.terminal[by_node][1:] == self.terminal[by_node][:-1])[0]
            a, b = by_node[dup], by_node[dup + 1]
            raise ValueError(f"items {a} and {b} share the code tuple {tuple(codes[a][valid[a]].tolist())}")
        self.node_item = np.full(len(self.token), PAD, dtype=np.int64)
        self.node_item[ends] = first

    def __len__(self) -> int:
        return len(self.token)

    @property
    def n_nodes(self) -> int:
        """Nodes, root included (``len(trie)``)."""
        return len(self.token)

    @property
    def n_items(self) -> int:
        """Sequences the trie was built from (duplicates counted)."""
        return len(self.terminal)

    # ------------------------------------------------------------------ walking one prefix
    def step(self, node: int, code: int) -> int:
        """The node reached from ``node`` by ``code``, or -1 when no sequence continues that way."""
        kids = self.child_nodes[self.child_ptr[node] : self.child_ptr[node + 1]]
        pos = int(np.searchsorted(self.token[kids], code))
        return int(kids[pos]) if pos < len(kids) and self.token[kids[pos]] == code else PAD

    def node(self, prefix: Sequence[int]) -> int:
        """Node of a prefix (0 for the empty prefix), or -1 when no sequence starts with it."""
        node = 0
        for code in prefix:
            node = self.step(node, int(code))
            if node < 0:
                return PAD
        return node

    def allowed(self, prefix: Sequence[int]) -> np.ndarray:
        """Codes that may follow ``prefix`` (sorted); empty when the prefix is invalid or a leaf."""
        node = self.node(prefix)
        if node < 0:
            return self.token[:0]
        return self.token[self.child_nodes[self.child_ptr[node] : self.child_ptr[node + 1]]]

    def item(self, codes: Sequence[int]) -> int:
        """The (lowest) sequence equal to ``codes``, or -1."""
        node = self.node(codes)
        return int(self.node_item[node]) if node >= 0 else PAD

    def __contains__(self, codes: Sequence[int]) -> bool:
        return self.item(codes) >= 0

    # ------------------------------------------------------------------ whole levels at once
    @property
    def inner(self) -> np.ndarray:
        """Non-root nodes that have children, in preorder: the only ones whose logits are needed."""
        return np.flatnonzero(self.n_children[1:] > 0) + 1

    def path(self, node: int) -> np.ndarray:
        """Proper ancestors of ``node`` except the root, shallowest first."""
        out = []
        node = int(self.parent[node])
        while node > 0:
            out.append(node)
            node = int(self.parent[node])
        return np.asarray(out[::-1], dtype=np.int64)

    def children(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The children of ``nodes`` and, for each child, the position of its parent in ``nodes``."""
        counts = self.n_children[nodes]
        rows = np.repeat(np.arange(len(nodes)), counts)
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return self.child_nodes[np.repeat(self.child_ptr[nodes], counts) + offsets], rows

    def ancestors(self, nodes: np.ndarray) -> np.ndarray:
        """Sorted union of the proper ancestors of ``nodes``, root excluded."""
        found, current = [], self.parent[nodes]
        while len(current := current[current > 0]):
            found.append(current)
            current = self.parent[current]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)

    def subtree_sums(self, values: np.ndarray) -> np.ndarray:
        """``out[n]`` = sum of ``values`` over the subtree of ``n`` (itself included), deepest level first."""
        out = np.asarray(values, dtype=np.float64).copy()
        for level in range(int(self.depth.max()), 0, -1):
            nodes = np.flatnonzero(self.depth == level)
            out += np.bincount(self.parent[nodes], weights=out[nodes], minlength=len(out))
        return out

    def subtree_max(self, values: np.ndarray) -> np.ndarray:
        """``out[n]`` = max of ``values`` over the subtree of ``n`` (itself included), deepest level first."""
        out = np.asarray(values, dtype=np.float64).copy()
        for level in range(int(self.depth.max()), 0, -1):
            nodes = np.flatnonzero(self.depth == level)
            np.maximum.at(out, self.parent[nodes], out[nodes])
        return out

    def path_sums(self, values: np.ndarray) -> np.ndarray:
        """``out[n]`` = sum of ``values`` over the root-to-``n`` path (root excluded), level by level."""
        out = np.zeros(len(self), dtype=np.float64)
        for level in range(1, int(self.depth.max()) + 1):
            nodes = np.flatnonzero(self.depth == level)
            out[nodes] = out[self.parent[nodes]] + values[nodes]
        return out


def _padded(sequences: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """``sequences`` as an int64 array ``(n, max_len)`` padded with -1 at the end."""
    if isinstance(sequences, np.ndarray):
        if sequences.ndim != 2 or sequences.shape[1] == 0:
            raise ValueError(f"Trie: codes must have shape (n, max_len), got {sequences.shape}")
        return sequences.astype(np.int64, copy=False)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    codes = np.full((len(lengths), int(lengths.max(initial=1))), PAD, dtype=np.int64)
    codes[np.arange(codes.shape[1]) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum())
    )
    return codes
