from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class SearchOptions(_message.Message):
    __slots__ = ("rerank", "skip_detection", "all_categories")
    RERANK_FIELD_NUMBER: _ClassVar[int]
    SKIP_DETECTION_FIELD_NUMBER: _ClassVar[int]
    ALL_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    rerank: bool
    skip_detection: bool
    all_categories: bool
    def __init__(self, rerank: _Optional[bool] = ..., skip_detection: _Optional[bool] = ..., all_categories: _Optional[bool] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image", "top_k", "category_hint", "bbox", "options")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_HINT_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    category_hint: str
    bbox: Box
    options: SearchOptions
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., category_hint: _Optional[str] = ..., bbox: _Optional[_Union[Box, _Mapping]] = ..., options: _Optional[_Union[SearchOptions, _Mapping]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("box", "category", "score")
    BOX_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    box: Box
    category: str
    score: float
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., category: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class MainObject(_message.Message):
    __slots__ = ("box", "category", "score", "fallback", "source")
    BOX_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    box: Box
    category: str
    score: float
    fallback: bool
    source: str
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., category: _Optional[str] = ..., score: _Optional[float] = ..., fallback: _Optional[bool] = ..., source: _Optional[str] = ...) -> None: ...

class CategoryVote(_message.Message):
    __slots__ = ("category", "detector", "neighbours", "combined", "head")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    COMBINED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    category: str
    detector: float
    neighbours: float
    combined: float
    head: float
    def __init__(self, category: _Optional[str] = ..., detector: _Optional[float] = ..., neighbours: _Optional[float] = ..., combined: _Optional[float] = ..., head: _Optional[float] = ...) -> None: ...

class CategoryDecision(_message.Message):
    __slots__ = ("category", "score", "source", "votes")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    category: str
    score: float
    source: str
    votes: _containers.RepeatedCompositeFieldContainer[CategoryVote]
    def __init__(self, category: _Optional[str] = ..., score: _Optional[float] = ..., source: _Optional[str] = ..., votes: _Optional[_Iterable[_Union[CategoryVote, _Mapping]]] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("sku", "score", "item_id", "category", "title", "image_key", "similarity", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SKU_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    sku: str
    score: float
    item_id: int
    category: str
    title: str
    image_key: str
    similarity: float
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, sku: _Optional[str] = ..., score: _Optional[float] = ..., item_id: _Optional[int] = ..., category: _Optional[str] = ..., title: _Optional[str] = ..., image_key: _Optional[str] = ..., similarity: _Optional[float] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CategoryScore(_message.Message):
    __slots__ = ("category", "score")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    category: str
    score: float
    def __init__(self, category: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class AttributeValue(_message.Message):
    __slots__ = ("value", "score")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    value: str
    score: float
    def __init__(self, value: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class AttributePrediction(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedCompositeFieldContainer[AttributeValue]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[_Union[AttributeValue, _Mapping]]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "ms")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    ms: float
    def __init__(self, stage: _Optional[str] = ..., ms: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("detections", "main_object", "category", "results", "index_version", "timings", "reranked", "category_top", "attributes")
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAIN_OBJECT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_TOP_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    main_object: MainObject
    category: CategoryDecision
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    index_version: str
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    reranked: bool
    category_top: _containers.RepeatedCompositeFieldContainer[CategoryScore]
    attributes: _containers.RepeatedCompositeFieldContainer[AttributePrediction]
    def __init__(self, detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., main_object: _Optional[_Union[MainObject, _Mapping]] = ..., category: _Optional[_Union[CategoryDecision, _Mapping]] = ..., results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., index_version: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., reranked: _Optional[bool] = ..., category_top: _Optional[_Iterable[_Union[CategoryScore, _Mapping]]] = ..., attributes: _Optional[_Iterable[_Union[AttributePrediction, _Mapping]]] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    def __init__(self, image: _Optional[bytes] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("detections", "main_object", "width", "height", "timings")
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAIN_OBJECT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    main_object: MainObject
    width: int
    height: int
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., main_object: _Optional[_Union[MainObject, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("image", "bbox", "skip_detection")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    SKIP_DETECTION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    bbox: Box
    skip_detection: bool
    def __init__(self, image: _Optional[bytes] = ..., bbox: _Optional[_Union[Box, _Mapping]] = ..., skip_detection: _Optional[bool] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embedding", "box", "index_version", "timings")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    box: Box
    index_version: str
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, embedding: _Optional[_Iterable[float]] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., index_version: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CategoryCount(_message.Message):
    __slots__ = ("category", "count")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    category: str
    count: int
    def __init__(self, category: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("version", "ntotal", "dim", "categories", "has_detector", "manifest_json", "max_top_k")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NTOTAL_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    HAS_DETECTOR_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    version: str
    ntotal: int
    dim: int
    categories: _containers.RepeatedCompositeFieldContainer[CategoryCount]
    has_detector: bool
    manifest_json: str
    max_top_k: int
    def __init__(self, version: _Optional[str] = ..., ntotal: _Optional[int] = ..., dim: _Optional[int] = ..., categories: _Optional[_Iterable[_Union[CategoryCount, _Mapping]]] = ..., has_detector: _Optional[bool] = ..., manifest_json: _Optional[str] = ..., max_top_k: _Optional[int] = ...) -> None: ...

class ReloadIndexRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ReloadIndexResponse(_message.Message):
    __slots__ = ("previous_version", "version", "changed")
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    previous_version: str
    version: str
    changed: bool
    def __init__(self, previous_version: _Optional[str] = ..., version: _Optional[str] = ..., changed: _Optional[bool] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("image", "bbox", "skip_detection")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    SKIP_DETECTION_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    bbox: Box
    skip_detection: bool
    def __init__(self, image: _Optional[bytes] = ..., bbox: _Optional[_Union[Box, _Mapping]] = ..., skip_detection: _Optional[bool] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("detections", "main_object", "category", "category_top", "attributes", "index_version", "timings")
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAIN_OBJECT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_TOP_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    main_object: MainObject
    category: CategoryDecision
    category_top: _containers.RepeatedCompositeFieldContainer[CategoryScore]
    attributes: _containers.RepeatedCompositeFieldContainer[AttributePrediction]
    index_version: str
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., main_object: _Optional[_Union[MainObject, _Mapping]] = ..., category: _Optional[_Union[CategoryDecision, _Mapping]] = ..., category_top: _Optional[_Iterable[_Union[CategoryScore, _Mapping]]] = ..., attributes: _Optional[_Iterable[_Union[AttributePrediction, _Mapping]]] = ..., index_version: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class CutoutRequest(_message.Message):
    __slots__ = ("image", "bbox")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    bbox: Box
    def __init__(self, image: _Optional[bytes] = ..., bbox: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class CutoutResponse(_message.Message):
    __slots__ = ("rgba_png", "mask_png", "quality", "box", "status", "index_version", "timings")
    RGBA_PNG_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    rgba_png: bytes
    mask_png: bytes
    quality: float
    box: Box
    status: str
    index_version: str
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, rgba_png: _Optional[bytes] = ..., mask_png: _Optional[bytes] = ..., quality: _Optional[float] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., status: _Optional[str] = ..., index_version: _Optional[str] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...
