"""The step graph while compiling: a small directed graph and the few walks the checks need.

networkx's import costs ~0.1 s (its package and its scan of installed backends), more than
checking a small file takes, so the compiler keeps its own graph and `CompiledPipeline.graph`
becomes a networkx DiGraph only when something asks for it (flowc.ir).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class Dag:
    """Nodes with data, and edges with data, both kept in insertion order."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.edges: dict[tuple[str, str], dict[str, Any]] = {}
        self.succ: dict[str, dict[str, None]] = {}
        self.pred: dict[str, dict[str, None]] = {}

    def add_node(self, node: str) -> None:
        if node not in self.nodes:
            self.nodes[node] = {}
            self.succ[node] = {}
            self.pred[node] = {}

    def add_edge(self, u: str, v: str, **data: Any) -> dict[str, Any]:
        """The edge's data (created when new, updated with ``data``)."""
        self.add_node(u)
        self.add_node(v)
        attrs = self.edges.setdefault((u, v), {})
        attrs.update(data)
        self.succ[u][v] = None
        self.pred[v][u] = None
        return attrs

    def has_edge(self, u: str, v: str) -> bool:
        return (u, v) in self.edges

    def successors(self, node: str) -> Iterable[str]:
        return self.succ[node]

    def predecessors(self, node: str) -> Iterable[str]:
        return self.pred[node]

    def to_networkx(self) -> Any:
        """The same graph as a networkx DiGraph (same node and edge order, same data)."""
        import networkx as nx

        g = nx.DiGraph()
        g.add_nodes_from(self.nodes.items())
        g.add_edges_from((u, v, d) for (u, v), d in self.edges.items())
        return g


def topological_order(g: Dag, key: Callable[[str], Any]) -> list[str] | None:
    """The nodes in dependency order, ties broken by ``key`` (smallest first); None when the
    graph has a cycle. The same order as networkx's lexicographical_topological_sort."""
    indegree = {n: len(p) for n, p in g.pred.items()}
    ready = [(key(n), i, n) for i, n in enumerate(g.nodes) if indegree[n] == 0]
    heapq.heapify(ready)
    rank = {n: i for i, n in enumerate(g.nodes)}
    order: list[str] = []
    while ready:
        _, _, node = heapq.heappop(ready)
        order.append(node)
        for nxt in g.succ[node]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                heapq.heappush(ready, (key(nxt), rank[nxt], nxt))
    return order if len(order) == len(g.nodes) else None


def cyclic_components(g: Dag) -> Iterator[set[str]]:
    """The strongly connected components that hold a cycle (two or more nodes, or one with
    an edge to itself); Tarjan's algorithm, without recursion (a chain of 10,000 steps)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    for root in g.nodes:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(g.succ[root]))]
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(g.succ[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.add(member)
                        if member == node:
                            break
                    if len(comp) > 1 or g.has_edge(node, node):
                        yield comp


def shortest_cycle(g: Dag, start: str, within: set[str]) -> list[str]:
    """A shortest cycle through ``start`` using only nodes ``within`` its component: a
    breadth-first walk from ``start`` back to it."""
    if g.has_edge(start, start):
        return [start]
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in g.succ[node]:
            if nxt == start:
                path = [node]
                while (prev := parent[path[-1]]) is not None:
                    path.append(prev)
                return path[::-1]
            if nxt in within and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return [start]


def with_ancestors(g: Dag, nodes: set[str]) -> set[str]:
    """``nodes`` and every node with a path to one of them, in one walk of the graph (a walk
    per node, as networkx's ancestors, took 2.8 s at 10,000 steps)."""
    seen, stack = set(nodes), list(nodes)
    while stack:
        for pred in g.pred[stack.pop()]:
            if pred not in seen:
                seen.add(pred)
                stack.append(pred)
    return seen
