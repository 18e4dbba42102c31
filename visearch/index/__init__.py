"""The gallery index: FAISS search per category, the neighbour graph, item metadata and
versioned, atomically activated index directories."""

from visearch.index.build import build_version, update_version
from visearch.index.gallery import PAD_SIMILARITY, GalleryIndex, choose_factory
from visearch.index.graph import NeighbourGraph, build_neighbour_graph, update_neighbour_graph
from visearch.index.items import ItemStore
from visearch.index.root import IndexRoot, IndexVersion, VerifyReport

__all__ = [
    "PAD_SIMILARITY",
    "GalleryIndex",
    "IndexRoot",
    "IndexVersion",
    "ItemStore",
    "NeighbourGraph",
    "VerifyReport",
    "build_neighbour_graph",
    "build_version",
    "choose_factory",
    "update_neighbour_graph",
    "update_version",
]
