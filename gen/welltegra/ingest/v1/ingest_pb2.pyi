import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataPoint(_message.Message):
    __slots__ = ("well_id", "timestamp", "parameter_name", "value", "unit", "quality_code", "source")
    WELL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_CODE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    well_id: str
    timestamp: _timestamp_pb2.Timestamp
    parameter_name: str
    value: float
    unit: str
    quality_code: str
    source: str
    def __init__(self, well_id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., parameter_name: _Optional[str] = ..., value: _Optional[float] = ..., unit: _Optional[str] = ..., quality_code: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("tenant_id", "agent_id", "batch_sequence", "data_points", "historical", "data_gaps")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DATA_POINTS_FIELD_NUMBER: _ClassVar[int]
    HISTORICAL_FIELD_NUMBER: _ClassVar[int]
    DATA_GAPS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    agent_id: str
    batch_sequence: int
    data_points: _containers.RepeatedCompositeFieldContainer[DataPoint]
    historical: bool
    data_gaps: _containers.RepeatedCompositeFieldContainer[DataGap]
    def __init__(self, tenant_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., batch_sequence: _Optional[int] = ..., data_points: _Optional[_Iterable[_Union[DataPoint, _Mapping]]] = ..., historical: _Optional[bool] = ..., data_gaps: _Optional[_Iterable[_Union[DataGap, _Mapping]]] = ...) -> None: ...

class DataGap(_message.Message):
    __slots__ = ("well_id", "parameter_name", "first_timestamp", "last_timestamp", "point_count", "reason", "source")
    WELL_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_NAME_FIELD_NUMBER: _ClassVar[int]
    FIRST_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    LAST_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    POINT_COUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    well_id: str
    parameter_name: str
    first_timestamp: _timestamp_pb2.Timestamp
    last_timestamp: _timestamp_pb2.Timestamp
    point_count: int
    reason: str
    source: str
    def __init__(self, well_id: _Optional[str] = ..., parameter_name: _Optional[str] = ..., first_timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., point_count: _Optional[int] = ..., reason: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("index", "field", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    field: str
    reason: str
    def __init__(self, index: _Optional[int] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("batch_sequence", "accepted_count", "rejected_count", "duplicate_count", "rejections", "duplicate_batch", "ingestion_id", "gap_count")
    BATCH_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_BATCH_FIELD_NUMBER: _ClassVar[int]
    INGESTION_ID_FIELD_NUMBER: _ClassVar[int]
    GAP_COUNT_FIELD_NUMBER: _ClassVar[int]
    batch_sequence: int
    accepted_count: int
    rejected_count: int
    duplicate_count: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    duplicate_batch: bool
    ingestion_id: str
    gap_count: int
    def __init__(self, batch_sequence: _Optional[int] = ..., accepted_count: _Optional[int] = ..., rejected_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., duplicate_batch: _Optional[bool] = ..., ingestion_id: _Optional[str] = ..., gap_count: _Optional[int] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("batches", "accepted_count", "rejected_count", "duplicate_count")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[BatchResult]
    accepted_count: int
    rejected_count: int
    duplicate_count: int
    def __init__(self, batches: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ..., accepted_count: _Optional[int] = ..., rejected_count: _Optional[int] = ..., duplicate_count: _Optional[int] = ...) -> None: ...

class IngestRealtimeRequest(_message.Message):
    __slots__ = ("tenant_id", "data_points", "ingestion_timestamp")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_POINTS_FIELD_NUMBER: _ClassVar[int]
    INGESTION_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    data_points: _containers.RepeatedCompositeFieldContainer[DataPoint]
    ingestion_timestamp: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., data_points: _Optional[_Iterable[_Union[DataPoint, _Mapping]]] = ..., ingestion_timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class IngestRealtimeResponse(_message.Message):
    __slots__ = ("status", "message", "tenant_id", "ingestion_id", "accepted_count", "rejected_count", "processing_time_ms", "duplicate_count", "rejections")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    INGESTION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    status: str
    message: str
    tenant_id: str
    ingestion_id: str
    accepted_count: int
    rejected_count: int
    processing_time_ms: int
    duplicate_count: int
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    def __init__(self, status: _Optional[str] = ..., message: _Optional[str] = ..., tenant_id: _Optional[str] = ..., ingestion_id: _Optional[str] = ..., accepted_count: _Optional[int] = ..., rejected_count: _Optional[int] = ..., processing_time_ms: _Optional[int] = ..., duplicate_count: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ...) -> None: ...
