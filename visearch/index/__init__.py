"""The gallery index: FAISS search per category (or a Milvus collection), the neighbour
graph, item metadata and versioned, atomically activated index directories."""

from visearch.index.backend import FaissBackend, MilvusBackend, load_gallery
from visearch.index.build import build_version, update_version
from visearch.index.gallery import PAD_SIMILARITY, GalleryIndex, choose_factory
from visearch.index.graph import NeighbourGraph, build_neighbour_graph, update_neighbour_graph
from visearch.index.items import ItemStore
from visearch.index.root import IndexRoot, IndexVersion, VerifyReport

__all__ = [
    "PAD_SIMILARITY",
    "FaissBackend",
    "GalleryIndex",
    "IndexRoot",
    "IndexVersion",
    "ItemStore",
    "MilvusBackend",
    "NeighbourGraph",
    "VerifyReport",
    "build_neighbour_graph",
    "build_version",
    "choose_factory",
    "load_gallery",
    "update_neighbour_graph",
    "update_version",
]
