from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestAuth(_message.Message):
    __slots__ = ("worker_id", "timestamp_ms", "nonce", "signature")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, worker_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("auth", "public_key", "name", "institution", "device", "memory_bytes", "bandwidth_mbit", "trust_class", "available_until", "slurm_job_id", "precision", "institution_certificate", "grid_gco2_per_kwh")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_MBIT_FIELD_NUMBER: _ClassVar[int]
    TRUST_CLASS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    SLURM_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    INSTITUTION_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    GRID_GCO2_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    public_key: bytes
    name: str
    institution: str
    device: str
    memory_bytes: int
    bandwidth_mbit: float
    trust_class: str
    available_until: float
    slurm_job_id: str
    precision: str
    institution_certificate: bytes
    grid_gco2_per_kwh: float
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., public_key: _Optional[bytes] = ..., name: _Optional[str] = ..., institution: _Optional[str] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., bandwidth_mbit: _Optional[float] = ..., trust_class: _Optional[str] = ..., available_until: _Optional[float] = ..., slurm_job_id: _Optional[str] = ..., precision: _Optional[str] = ..., institution_certificate: _Optional[bytes] = ..., grid_gco2_per_kwh: _Optional[float] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("worker_id", "run_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    run_id: str
    def __init__(self, worker_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class GetRunConfigRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("run_id", "model_preset", "vocab_size", "seed", "seq_len", "batch_size", "inner_steps", "inner_lr", "outer_lr", "outer_momentum", "total_rounds", "target_group_size", "matchmaking_seconds", "averaging_timeout_seconds", "lease_seconds", "heartbeat_seconds", "initial_peers", "dht_prefix", "tokenizer_json", "tokenizer_sha256", "corpus_root_hash", "shard_dir", "compression", "error_feedback", "round_seconds", "checkpoint_every_rounds", "leases_per_round", "governance_ledger", "micro_batch_size", "compile", "data_url", "credential_key", "aggregation", "verify_fraction", "fresh_inner_optimizer", "eval_every_rounds", "overlap_averaging")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PRESET_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    INNER_LR_FIELD_NUMBER: _ClassVar[int]
    OUTER_LR_FIELD_NUMBER: _ClassVar[int]
    OUTER_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MATCHMAKING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AVERAGING_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    DHT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    CORPUS_ROOT_HASH_FIELD_NUMBER: _ClassVar[int]
    SHARD_DIR_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    ROUND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LEASES_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    GOVERNANCE_LEDGER_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPILE_FIELD_NUMBER: _ClassVar[int]
    DATA_URL_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_KEY_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    FRESH_INNER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_AVERAGING_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_preset: str
    vocab_size: int
    seed: int
    seq_len: int
    batch_size: int
    inner_steps: int
    inner_lr: float
    outer_lr: float
    outer_momentum: float
    total_rounds: int
    target_group_size: int
    matchmaking_seconds: float
    averaging_timeout_seconds: float
    lease_seconds: int
    heartbeat_seconds: int
    initial_peers: _containers.RepeatedScalarFieldContainer[str]
    dht_prefix: str
    tokenizer_json: bytes
    tokenizer_sha256: str
    corpus_root_hash: str
    shard_dir: str
    compression: str
    error_feedback: bool
    round_seconds: float
    checkpoint_every_rounds: int
    leases_per_round: int
    governance_ledger: bytes
    micro_batch_size: int
    compile: bool
    data_url: str
    credential_key: bytes
    aggregation: str
    verify_fraction: float
    fresh_inner_optimizer: bool
    eval_every_rounds: int
    overlap_averaging: bool
    def __init__(self, run_id: _Optional[str] = ..., model_preset: _Optional[str] = ..., vocab_size: _Optional[int] = ..., seed: _Optional[int] = ..., seq_len: _Optional[int] = ..., batch_size: _Optional[int] = ..., inner_steps: _Optional[int] = ..., inner_lr: _Optional[float] = ..., outer_lr: _Optional[float] = ..., outer_momentum: _Optional[float] = ..., total_rounds: _Optional[int] = ..., target_group_size: _Optional[int] = ..., matchmaking_seconds: _Optional[float] = ..., averaging_timeout_seconds: _Optional[float] = ..., lease_seconds: _Optional[int] = ..., heartbeat_seconds: _Optional[int] = ..., initial_peers: _Optional[_Iterable[str]] = ..., dht_prefix: _Optional[str] = ..., tokenizer_json: _Optional[bytes] = ..., tokenizer_sha256: _Optional[str] = ..., corpus_root_hash: _Optional[str] = ..., shard_dir: _Optional[str] = ..., compression: _Optional[str] = ..., error_feedback: _Optional[bool] = ..., round_seconds: _Optional[float] = ..., checkpoint_every_rounds: _Optional[int] = ..., leases_per_round: _Optional[int] = ..., governance_ledger: _Optional[bytes] = ..., micro_batch_size: _Optional[int] = ..., compile: _Optional[bool] = ..., data_url: _Optional[str] = ..., credential_key: _Optional[bytes] = ..., aggregation: _Optional[str] = ..., verify_fraction: _Optional[float] = ..., fresh_inner_optimizer: _Optional[bool] = ..., eval_every_rounds: _Optional[int] = ..., overlap_averaging: _Optional[bool] = ...) -> None: ...

class ReadCorpusFileRequest(_message.Message):
    __slots__ = ("auth", "file", "offset", "length")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    file: str
    offset: int
    length: int
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class CorpusBytes(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ReachabilityRequest(_message.Message):
    __slots__ = ("auth", "port", "token")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    port: int
    token: bytes
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., port: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class ReachabilityReply(_message.Message):
    __slots__ = ("reachable", "seen_host", "error")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    SEEN_HOST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    seen_host: str
    error: str
    def __init__(self, reachable: _Optional[bool] = ..., seen_host: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class TrainingShapeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainingShape(_message.Message):
    __slots__ = ("run_id", "model_preset", "vocab_size", "seq_len", "batch_size", "micro_batch_size", "error_feedback")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PRESET_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_preset: str
    vocab_size: int
    seq_len: int
    batch_size: int
    micro_batch_size: int
    error_feedback: bool
    def __init__(self, run_id: _Optional[str] = ..., model_preset: _Optional[str] = ..., vocab_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., batch_size: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., error_feedback: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("auth", "round", "loss", "tokens_per_second")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    round: int
    loss: float
    tokens_per_second: float
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., round: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("live_workers", "current_round", "governance_head", "kept_params_digest", "quarantined")
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    GOVERNANCE_HEAD_FIELD_NUMBER: _ClassVar[int]
    KEPT_PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    live_workers: int
    current_round: int
    governance_head: str
    kept_params_digest: str
    quarantined: bool
    def __init__(self, live_workers: _Optional[int] = ..., current_round: _Optional[int] = ..., governance_head: _Optional[str] = ..., kept_params_digest: _Optional[str] = ..., quarantined: _Optional[bool] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "shard_id", "shard_file", "shard_sha256", "shard_tokens", "dtype", "start", "end", "round", "deadline_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_FILE_FIELD_NUMBER: _ClassVar[int]
    SHARD_SHA256_FIELD_NUMBER: _ClassVar[int]
    SHARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    shard_id: str
    shard_file: str
    shard_sha256: str
    shard_tokens: int
    dtype: str
    start: int
    end: int
    round: int
    deadline_ms: int
    def __init__(self, lease_id: _Optional[int] = ..., shard_id: _Optional[str] = ..., shard_file: _Optional[str] = ..., shard_sha256: _Optional[str] = ..., shard_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., round: _Optional[int] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class AcquireLeaseRequest(_message.Message):
    __slots__ = ("auth", "max_tokens", "round", "peer_id")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    max_tokens: int
    round: int
    peer_id: str
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., max_tokens: _Optional[int] = ..., round: _Optional[int] = ..., peer_id: _Optional[str] = ...) -> None: ...

class AcquireLeaseReply(_message.Message):
    __slots__ = ("status", "lease", "retry_after_ms", "round_credential")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GRANTED: _ClassVar[AcquireLeaseReply.Status]
        POOL_EMPTY: _ClassVar[AcquireLeaseReply.Status]
        RUN_COMPLETE: _ClassVar[AcquireLeaseReply.Status]
        BACKOFF: _ClassVar[AcquireLeaseReply.Status]
        ALLOCATION_ENDING: _ClassVar[AcquireLeaseReply.Status]
        ROUND_OVER: _ClassVar[AcquireLeaseReply.Status]
        AT_LIMIT: _ClassVar[AcquireLeaseReply.Status]
        QUARANTINED: _ClassVar[AcquireLeaseReply.Status]
        NOT_OPEN: _ClassVar[AcquireLeaseReply.Status]
    GRANTED: AcquireLeaseReply.Status
    POOL_EMPTY: AcquireLeaseReply.Status
    RUN_COMPLETE: AcquireLeaseReply.Status
    BACKOFF: AcquireLeaseReply.Status
    ALLOCATION_ENDING: AcquireLeaseReply.Status
    ROUND_OVER: AcquireLeaseReply.Status
    AT_LIMIT: AcquireLeaseReply.Status
    QUARANTINED: AcquireLeaseReply.Status
    NOT_OPEN: AcquireLeaseReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    ROUND_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    status: AcquireLeaseReply.Status
    lease: Lease
    retry_after_ms: int
    round_credential: bytes
    def __init__(self, status: _Optional[_Union[AcquireLeaseReply.Status, str]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., retry_after_ms: _Optional[int] = ..., round_credential: _Optional[bytes] = ...) -> None: ...

class LeaseUsage(_message.Message):
    __slots__ = ("lease_id", "tokens_consumed")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    tokens_consumed: int
    def __init__(self, lease_id: _Optional[int] = ..., tokens_consumed: _Optional[int] = ...) -> None: ...

class CompleteRoundRequest(_message.Message):
    __slots__ = ("auth", "round", "leases", "loss", "pseudo_gradient_digest", "params_digest", "group_size", "bytes_sent", "inner_seconds", "wall_seconds", "member_statements", "claim", "witnesses", "energy", "evaluation")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_GRADIENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    INNER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    WITNESSES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    round: int
    leases: _containers.RepeatedCompositeFieldContainer[LeaseUsage]
    loss: float
    pseudo_gradient_digest: str
    params_digest: str
    group_size: int
    bytes_sent: int
    inner_seconds: float
    wall_seconds: float
    member_statements: _containers.RepeatedScalarFieldContainer[bytes]
    claim: WorkClaim
    witnesses: _containers.RepeatedCompositeFieldContainer[SliceWitness]
    energy: RoundEnergy
    evaluation: Evaluation
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., round: _Optional[int] = ..., leases: _Optional[_Iterable[_Union[LeaseUsage, _Mapping]]] = ..., loss: _Optional[float] = ..., pseudo_gradient_digest: _Optional[str] = ..., params_digest: _Optional[str] = ..., group_size: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., inner_seconds: _Optional[float] = ..., wall_seconds: _Optional[float] = ..., member_statements: _Optional[_Iterable[bytes]] = ..., claim: _Optional[_Union[WorkClaim, _Mapping]] = ..., witnesses: _Optional[_Iterable[_Union[SliceWitness, _Mapping]]] = ..., energy: _Optional[_Union[RoundEnergy, _Mapping]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class RoundEnergy(_message.Message):
    __slots__ = ("joules", "method")
    JOULES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    joules: float
    method: str
    def __init__(self, joules: _Optional[float] = ..., method: _Optional[str] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("params_digest", "figures")
    PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    params_digest: str
    figures: _containers.RepeatedCompositeFieldContainer[EvalFigure]
    def __init__(self, params_digest: _Optional[str] = ..., figures: _Optional[_Iterable[_Union[EvalFigure, _Mapping]]] = ...) -> None: ...

class EvalFigure(_message.Message):
    __slots__ = ("group", "name", "tokens", "bytes", "loss", "bits_per_byte")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_BYTE_FIELD_NUMBER: _ClassVar[int]
    group: str
    name: str
    tokens: int
    bytes: int
    loss: float
    bits_per_byte: float
    def __init__(self, group: _Optional[str] = ..., name: _Optional[str] = ..., tokens: _Optional[int] = ..., bytes: _Optional[int] = ..., loss: _Optional[float] = ..., bits_per_byte: _Optional[float] = ...) -> None: ...

class WorkClaim(_message.Message):
    __slots__ = ("pseudo_gradient_digest", "pseudo_gradient_norm", "loss_before", "loss_after", "step_leases", "micro_batch_size", "device", "precision")
    PSEUDO_GRADIENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PSEUDO_GRADIENT_NORM_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    STEP_LEASES_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    pseudo_gradient_digest: str
    pseudo_gradient_norm: float
    loss_before: float
    loss_after: float
    step_leases: _containers.RepeatedScalarFieldContainer[int]
    micro_batch_size: int
    device: str
    precision: str
    def __init__(self, pseudo_gradient_digest: _Optional[str] = ..., pseudo_gradient_norm: _Optional[float] = ..., loss_before: _Optional[float] = ..., loss_after: _Optional[float] = ..., step_leases: _Optional[_Iterable[int]] = ..., micro_batch_size: _Optional[int] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ...) -> None: ...

class SliceWitness(_message.Message):
    __slots__ = ("sender_peer_id", "start", "end", "finite", "norm", "projections", "cosine_to_aggregate", "median_norm")
    SENDER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    FINITE_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    COSINE_TO_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_NORM_FIELD_NUMBER: _ClassVar[int]
    sender_peer_id: str
    start: int
    end: int
    finite: bool
    norm: float
    projections: _containers.RepeatedScalarFieldContainer[float]
    cosine_to_aggregate: float
    median_norm: float
    def __init__(self, sender_peer_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., finite: _Optional[bool] = ..., norm: _Optional[float] = ..., projections: _Optional[_Iterable[float]] = ..., cosine_to_aggregate: _Optional[float] = ..., median_norm: _Optional[float] = ...) -> None: ...

class CompleteRoundReply(_message.Message):
    __slots__ = ("lineage_ids", "lineage_head", "accepted", "round_params_digest", "pending", "retry_after_ms")
    LINEAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_HEAD_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    lineage_ids: _containers.RepeatedScalarFieldContainer[int]
    lineage_head: int
    accepted: bool
    round_params_digest: str
    pending: bool
    retry_after_ms: int
    def __init__(self, lineage_ids: _Optional[_Iterable[int]] = ..., lineage_head: _Optional[int] = ..., accepted: _Optional[bool] = ..., round_params_digest: _Optional[str] = ..., pending: _Optional[bool] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class TakeCheckRequest(_message.Message):
    __slots__ = ("auth",)
    AUTH_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ...) -> None: ...

class CheckAssignment(_message.Message):
    __slots__ = ("check_id", "worker_id", "round", "leases", "usage", "claim", "witnesses", "start_params_digest", "retry_after_ms", "witness_classes")
    CHECK_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    WITNESSES_FIELD_NUMBER: _ClassVar[int]
    START_PARAMS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    WITNESS_CLASSES_FIELD_NUMBER: _ClassVar[int]
    check_id: int
    worker_id: str
    round: int
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    usage: _containers.RepeatedCompositeFieldContainer[LeaseUsage]
    claim: WorkClaim
    witnesses: _containers.RepeatedCompositeFieldContainer[SliceWitness]
    start_params_digest: str
    retry_after_ms: int
    witness_classes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, check_id: _Optional[int] = ..., worker_id: _Optional[str] = ..., round: _Optional[int] = ..., leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., usage: _Optional[_Iterable[_Union[LeaseUsage, _Mapping]]] = ..., claim: _Optional[_Union[WorkClaim, _Mapping]] = ..., witnesses: _Optional[_Iterable[_Union[SliceWitness, _Mapping]]] = ..., start_params_digest: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., witness_classes: _Optional[_Iterable[str]] = ...) -> None: ...

class VerdictRequest(_message.Message):
    __slots__ = ("auth", "check_id", "outcome", "reason", "exact", "cosine", "norm_ratio")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PASSED: _ClassVar[VerdictRequest.Outcome]
        FAILED: _ClassVar[VerdictRequest.Outcome]
        INCONCLUSIVE: _ClassVar[VerdictRequest.Outcome]
    PASSED: VerdictRequest.Outcome
    FAILED: VerdictRequest.Outcome
    INCONCLUSIVE: VerdictRequest.Outcome
    AUTH_FIELD_NUMBER: _ClassVar[int]
    CHECK_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    NORM_RATIO_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    check_id: int
    outcome: VerdictRequest.Outcome
    reason: str
    exact: bool
    cosine: float
    norm_ratio: float
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., check_id: _Optional[int] = ..., outcome: _Optional[_Union[VerdictRequest.Outcome, str]] = ..., reason: _Optional[str] = ..., exact: _Optional[bool] = ..., cosine: _Optional[float] = ..., norm_ratio: _Optional[float] = ...) -> None: ...

class VerdictReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("auth", "lease_id", "reason")
    AUTH_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    auth: RequestAuth
    lease_id: int
    reason: str
    def __init__(self, auth: _Optional[_Union[RequestAuth, _Mapping]] = ..., lease_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseLeaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("worker_offset", "worker_limit")
    WORKER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    WORKER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    worker_offset: int
    worker_limit: int
    def __init__(self, worker_offset: _Optional[int] = ..., worker_limit: _Optional[int] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("name", "institution", "trust_class", "device", "tokens_per_second", "round", "live", "leases", "available_until", "precision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    TRUST_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    institution: str
    trust_class: str
    device: str
    tokens_per_second: float
    round: int
    live: bool
    leases: int
    available_until: float
    precision: str
    def __init__(self, name: _Optional[str] = ..., institution: _Optional[str] = ..., trust_class: _Optional[str] = ..., device: _Optional[str] = ..., tokens_per_second: _Optional[float] = ..., round: _Optional[int] = ..., live: _Optional[bool] = ..., leases: _Optional[int] = ..., available_until: _Optional[float] = ..., precision: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("number", "reports", "tokens", "mean_loss", "group_size")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    number: int
    reports: int
    tokens: int
    mean_loss: float
    group_size: int
    def __init__(self, number: _Optional[int] = ..., reports: _Optional[int] = ..., tokens: _Optional[int] = ..., mean_loss: _Optional[float] = ..., group_size: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "current_round", "total_rounds", "workers", "leases_out", "tokens_out", "epoch", "epoch_tokens", "epoch_tokens_trained", "tokens_per_second", "eta_seconds", "recent_rounds", "workers_total", "live_workers")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LEASES_OUT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_OUT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_TOKENS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    current_round: int
    total_rounds: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    leases_out: int
    tokens_out: int
    epoch: int
    epoch_tokens: int
    epoch_tokens_trained: int
    tokens_per_second: float
    eta_seconds: float
    recent_rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    workers_total: int
    live_workers: int
    def __init__(self, run_id: _Optional[str] = ..., current_round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., leases_out: _Optional[int] = ..., tokens_out: _Optional[int] = ..., epoch: _Optional[int] = ..., epoch_tokens: _Optional[int] = ..., epoch_tokens_trained: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., recent_rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., workers_total: _Optional[int] = ..., live_workers: _Optional[int] = ...) -> None: ...

class RoundCredential(_message.Message):
    __slots__ = ("run_id", "worker_id", "worker_key", "peer_id", "round", "tokens", "trust_class", "expires_at")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_KEY_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUST_CLASS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    worker_id: str
    worker_key: bytes
    peer_id: str
    round: int
    tokens: int
    trust_class: str
    expires_at: float
    def __init__(self, run_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., worker_key: _Optional[bytes] = ..., peer_id: _Optional[str] = ..., round: _Optional[int] = ..., tokens: _Optional[int] = ..., trust_class: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class MemberStatement(_message.Message):
    __slots__ = ("run_id", "worker_id", "round", "leases", "loss")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    worker_id: str
    round: int
    leases: _containers.RepeatedCompositeFieldContainer[LeaseUsage]
    loss: float
    def __init__(self, run_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., round: _Optional[int] = ..., leases: _Optional[_Iterable[_Union[LeaseUsage, _Mapping]]] = ..., loss: _Optional[float] = ...) -> None: ...

class Signed(_message.Message):
    __slots__ = ("body", "signature")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...
