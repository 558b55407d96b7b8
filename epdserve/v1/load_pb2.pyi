from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetLoadRequest(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    def __init__(self, stage: _Optional[str] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("stage", "replica_id", "queued_requests", "running_requests", "queued_work", "work_per_s", "overhead_ms", "running_tokens", "free_kv_blocks", "total_kv_blocks", "kv_block_tokens", "max_running", "step_ms", "local_prefill_max_tokens", "prefix_block_tokens", "prefix_kv_settings", "model_revision", "host_id", "kv_pool_room_bytes", "kv_bytes_per_token")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_WORK_FIELD_NUMBER: _ClassVar[int]
    WORK_PER_S_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KV_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_ROOM_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    stage: str
    replica_id: str
    queued_requests: int
    running_requests: int
    queued_work: int
    work_per_s: float
    overhead_ms: float
    running_tokens: int
    free_kv_blocks: int
    total_kv_blocks: int
    kv_block_tokens: int
    max_running: int
    step_ms: float
    local_prefill_max_tokens: int
    prefix_block_tokens: int
    prefix_kv_settings: str
    model_revision: str
    host_id: str
    kv_pool_room_bytes: int
    kv_bytes_per_token: int
    def __init__(self, stage: _Optional[str] = ..., replica_id: _Optional[str] = ..., queued_requests: _Optional[int] = ..., running_requests: _Optional[int] = ..., queued_work: _Optional[int] = ..., work_per_s: _Optional[float] = ..., overhead_ms: _Optional[float] = ..., running_tokens: _Optional[int] = ..., free_kv_blocks: _Optional[int] = ..., total_kv_blocks: _Optional[int] = ..., kv_block_tokens: _Optional[int] = ..., max_running: _Optional[int] = ..., step_ms: _Optional[float] = ..., local_prefill_max_tokens: _Optional[int] = ..., prefix_block_tokens: _Optional[int] = ..., prefix_kv_settings: _Optional[str] = ..., model_revision: _Optional[str] = ..., host_id: _Optional[str] = ..., kv_pool_room_bytes: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ...) -> None: ...
