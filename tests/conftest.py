"""Fixtures: tiny random-weight checkpoints of the real architectures, with tokenizers that carry the
real special tokens, and a helper that runs a real `bentoml serve` process.

No hub is reachable from the test machines, so nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The int8 weight cache (runners/weight_cache.py) is off in the tests and in the servers they start: a test loads
# what it names, and nothing is written to the home directory. tests/test_weight_cache.py turns it on in a tmp dir.
os.environ["EMBED_WEIGHT_CACHE"] = "off"

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_CORPUS = [
    "yes no yes no the cat sat on the mat. an orange cat sleeps in the sun; a black dog runs on the grass",
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".',
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: Document:",
    "system user assistant think retrieve relevant images photo picture",
    "一只橙色的猫在阳光下晒太阳 黑色的狗在草地上奔跑 可爱的猫咪在睡觉",
]


def build_qwen_tokenizer(directory: Path, *, appends_end_of_text: bool) -> None:
    """A byte-level BPE tokenizer saved as Qwen2Tokenizer with Qwen's special tokens.

    appends_end_of_text=True behaves like Qwen3-Embedding's tokenizer (its post-processor appends
    <|endoftext|>); False like the base Qwen3 tokenizer (Z-Image-Turbo's), which appends nothing.
    'yes' and 'no' are single tokens, as in Qwen's real vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 50, trainer)
    if appends_end_of_text:
        end = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A $B <|endoftext|>", special_tokens=[("<|endoftext|>", end)]
        )
    wrapped = Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )
    wrapped.save_pretrained(str(directory))


def qwen3_config(vocab_size: int, **overrides):
    from transformers import Qwen3Config

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    settings.update(overrides)
    return Qwen3Config(**settings)


def write_st_config(directory: Path, pooling: str, max_seq_length: int, dimension: int) -> None:
    """The sentence-transformers files a model directory carries (modules.json + 1_Pooling)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "2_Normalize").mkdir(exist_ok=True)
    modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
    pooling_cfg = {"word_embedding_dimension": dimension, **{key: False for key in modes.values()}}
    pooling_cfg[modes[pooling]] = True
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


@pytest.fixture(scope="session")
def qwen3_embedding_dir(tmp_path_factory) -> Path:
    """Qwen3-Embedding layout: Qwen3Model, a tokenizer appending <|endoftext|>, ST config with last-token pooling."""
    from transformers import AutoTokenizer, Qwen3Model

    directory = tmp_path_factory.mktemp("qwen3-embedding")
    build_qwen_tokenizer(directory, appends_end_of_text=True)
    vocab = len(AutoTokenizer.from_pretrained(str(directory)))
    torch.manual_seed(0)
    Qwen3Model(qwen3_config(vocab)).save_pretrained(str(directory))
    write_st_config(directory, "last", 8192, 64)
    return directory


@pytest.fixture(scope="session")
def zimage_root(tmp_path_factory) -> Path:
    """Z-Image-Turbo layout: a diffusers root with text_encoder/ (Qwen3Model, tied embeddings) and tokenizer/."""
    from transformers import AutoTokenizer, Qwen3Model

    root = tmp_path_factory.mktemp("z-image-turbo")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    build_qwen_tokenizer(root / "tokenizer", appends_end_of_text=False)
    vocab = len(AutoTokenizer.from_pretrained(str(root / "tokenizer")))
    torch.manual_seed(1)
    Qwen3Model(qwen3_config(vocab)).save_pretrained(str(root / "text_encoder"))
    return root


@pytest.fixture(scope="session")
def qwen3_reranker_dir(tmp_path_factory) -> Path:
    """Qwen3-Reranker layout: Qwen3ForCausalLM with its own (untied) LM head; the tokenizer appends nothing."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    directory = tmp_path_factory.mktemp("qwen3-reranker")
    build_qwen_tokenizer(directory, appends_end_of_text=False)
    vocab = len(AutoTokenizer.from_pretrained(str(directory)))
    torch.manual_seed(3)
    # Larger random weights than the default 0.02, so that the scores spread over (0, 1) instead of sitting at 0.5.
    config = qwen3_config(vocab, tie_word_embeddings=False, initializer_range=0.2)
    Qwen3ForCausalLM(config).save_pretrained(str(directory))
    return directory


BGE_VOCAB_TEXT = "一只橙色的猫在阳光下晒太阳黑狗草地上奔跑可爱咪睡觉为这个句子生成表示以用于检索相关文章：，。"


@pytest.fixture(scope="session")
def bge_dir(tmp_path_factory) -> Path:
    """BGE layout: a BertModel, a Chinese BertTokenizer, and ST config with CLS pooling."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("bge")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *dict.fromkeys(BGE_VOCAB_TEXT),
        *"abcdefghijklmnopqrstuvwxyz0123456789",
    ]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # The vocabulary itself, not vocab_file: transformers 5 ignores vocab_file here (every character became [UNK]).
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(2)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(str(directory))
    write_st_config(directory, "cls", 512, 48)
    return directory


# -- a real `bentoml serve` process -----------------------------------------------------------------


MODEL_GATE_HOOK = REPO / "tests" / "model_gate"  # its sitecustomize.py wraps the queue of every server started here


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HANG_GUARD_SECONDS = 300  # how long a test waits for something that must happen: a hang guard, never an assertion


class ModelGate:
    """A test's hold on a served model's queue (tests/model_gate/sitecustomize.py does the server's side).

    While closed, each round the queue hands to the model waits before its forward pass; `submitted()`,
    `cancelled()` and `rounds()` are the item counts of every request queued, every request cancelled while
    queued (its client left) and every round taken, in order, since the server started.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def close(self) -> None:
        self.path.touch()

    def open(self) -> None:
        self.path.unlink(missing_ok=True)

    def submitted(self) -> list[int]:
        return self._read("submitted")

    def cancelled(self) -> list[int]:
        return self._read("cancelled")

    def disconnected(self) -> list[int]:
        """The client ports of the connections the server has seen end, in order."""
        return self._read("disconnected")

    def rounds(self) -> list[int]:
        return self._read("rounds")

    def _read(self, what: str) -> list[int]:
        record = self.path.with_name(f"{self.path.name}.{what}")
        return [int(line) for line in record.read_text().split()] if record.exists() else []

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll `condition` until it holds; fail (as a hang, naming `what`) only after HANG_GUARD_SECONDS."""
        deadline = time.monotonic() + HANG_GUARD_SECONDS
        while not condition():
            assert time.monotonic() < deadline, f"still waiting, after {HANG_GUARD_SECONDS} s, for {what}"
            time.sleep(0.02)


class Served:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path, gate: ModelGate) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path
        self.gate = gate
        self.seed_name = ""  # the table row, when known
        # Idle connections are dropped before uvicorn's 5 s keep-alive closes them, so a request is never
        # sent on a connection the server is closing at that moment (a ReadError on a loaded machine).
        # A hang guard, not a deadline: on a loaded machine a heavy request may take minutes.
        self.client = httpx.Client(base_url=url, timeout=HANG_GUARD_SECONDS, limits=httpx.Limits(keepalive_expiry=2))

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.client.get(path, **kwargs)


def serve(
    class_name: str, env: dict[str, str], log_path: Path, timeout: float = HANG_GUARD_SECONDS, port: int | None = None
) -> Iterator[Served]:
    """Start `bentoml serve service:<class_name>` on `port` (default: a free one); yield once GET /health answers."""
    port = port or free_port()
    # A BentoML home per server: a starting server empties $BENTOML_HOME/prometheus_multiproc_dir,
    # which would wipe the metrics of any server already running from the same home.
    home = log_path.parent / f"bentoml-home-{port}"
    gate = ModelGate(log_path.parent / f"model-gate-{port}")
    gate.open()
    python_path = os.pathsep.join(filter(None, [str(MODEL_GATE_HOOK), os.environ.get("PYTHONPATH")]))
    full_env = {
        **os.environ,
        "EMBED_DEVICE": "cpu",
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOME": str(home),
        "PYTHONPATH": python_path,
        "EMBED_TEST_GATE": str(gate.path),
        **env,
    }
    bentoml = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        f"service:{class_name}",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            bentoml, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"bentoml serve did not answer /health in {timeout}s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        served = Served(url, process, log_path, gate)
        yield served
        served.client.close()
    finally:
        gate.open()  # a test that failed with the gate closed must not hold the server's shutdown
        stop(process)


def stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# -- SigLIP2 ---------------------------------------------------------------------------------------

SIGLIP_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's ids 0..4, as in SigLIP2's tokenizer
_SIGLIP_CORPUS = [
    "an orange cat sleeps in the sun",
    "a black dog runs on the grass",
    "this is a photo of two cats",
    "a red square and a blue circle on a white page",
]


def build_siglip2_tokenizer(directory: Path, *, padding_side: str = "right") -> None:
    """A tiny Gemma tokenizer set up the way SigLIP2's checkpoints ship theirs.

    Same class (GemmaTokenizer: SentencePiece-style BPE, spaces as '▁'), same special tokens at the
    same ids (<pad>=0, <eos>=1, <bos>=2, <unk>=3), no <bos>, <eos> appended, right padding, input_ids
    only (the model attends to its padding, as trained). Only the vocabulary is tiny and lower-case,
    so an upper-case word becomes <unk> unless the caller lower-cases it.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=SIGLIP_SPECIALS, initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁")
    )
    trainer_tokenizer.train_from_iterator(_SIGLIP_CORPUS * 20, trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    tokenizer = GemmaTokenizer(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        add_bos_token=False,
        add_eos_token=True,
        padding_side=padding_side,
        model_input_names=["input_ids"],
    )
    tokenizer.save_pretrained(str(directory))


SIGLIP_IMAGE_SIZE = 32


def save_tiny_siglip(
    directory: Path, *, seed: int = 3, padding_side: str = "right", image_size: int = SIGLIP_IMAGE_SIZE
) -> Path:
    """SiglipModel (the fixed-resolution SigLIP2 architecture) with random weights, 32x32 images in 8x8
    patches (or image_size in 16x16 patches, as the real 512 checkpoints), 64 text positions, and a logit
    scale and bias that are not the zero they are initialised to."""
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    build_siglip2_tokenizer(directory, padding_side=padding_side)
    vocab = len(AutoTokenizer.from_pretrained(str(directory)))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=vocab, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, **tower
        ),
        vision_config=dict(image_size=image_size, patch_size=8 if image_size == SIGLIP_IMAGE_SIZE else 16, **tower),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)  # exp(2.3) ~ 10
        model.logit_bias.fill_(-1.5)
    model.save_pretrained(str(directory))
    # The real checkpoints' processor: resize to the model's size (bilinear), rescale, normalize with mean=std=0.5.
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory) -> Path:
    return save_tiny_siglip(tmp_path_factory.mktemp("siglip2"))


# Which tiny checkpoint each service is served on in the HTTP tests (a fixture name above).
SERVICE_MODEL_FIXTURES: dict[str, str] = {
    "bge_embed": "bge_dir",
    "qwen3_8b_embed": "qwen3_embedding_dir",
    "qwen3_4b_embed": "zimage_root",
    "qwen3_8b_rerank": "qwen3_reranker_dir",
    "qwen3_4b_rerank": "zimage_root",  # Qwen3-4B without a head: the 'yes'/'no' rows from its tied embeddings
    "siglip2_embed": "siglip_dir",
}


def serve_tiny(request: pytest.FixtureRequest, seed_name: str, tmp_path_factory, **env: str) -> Iterator[Served]:
    """`bentoml serve` one service of the table on its tiny checkpoint (no quantization: CPU)."""
    from embed_core.table import SERVICES

    spec = SERVICES[seed_name]
    model = request.getfixturevalue(SERVICE_MODEL_FIXTURES[seed_name])
    log_path = tmp_path_factory.mktemp(f"serve-{seed_name}") / "bentoml.log"
    for served in serve(spec.class_name, {spec.model_env: str(model), "EMBED_QUANTIZATION": "none", **env}, log_path):
        served.seed_name = seed_name
        yield served


# -- one BGE server for the client tests (tests/test_clients.py, tests/test_client_defaults.py) --------------

BGE_SERVED_MAX_LENGTH = 16  # BGE_EMBED_MAX_LENGTH there: [CLS], 14 characters, [SEP]
TIKTOKEN_WORDS = ["一只橙色的猫在阳光下晒太阳", "黑狗在草地上奔跑", "可爱的猫咪在睡觉", "猫", " the cat"]


def tiny_cl100k_ranks() -> dict[bytes, int]:
    """A stand-in for tiktoken's cl100k_base ranks (no network here): every byte, then each word above grown one
    byte at a time (each merge joins two earlier tokens, as BPE needs). Any text encodes and decodes back."""
    ranks = {bytes([value]): value for value in range(256)}
    for word in TIKTOKEN_WORDS:
        encoded = word.encode("utf-8")
        for end in range(2, len(encoded) + 1):
            ranks.setdefault(encoded[:end], len(ranks))
    return ranks


@pytest.fixture(scope="session")
def tiktoken_dir(tmp_path_factory) -> Path:
    """A folder with cl100k_base.tiktoken in tiktoken's file format (one `base64(token) rank` per line)."""
    import base64

    directory = tmp_path_factory.mktemp("tiktoken")
    ranks = sorted(tiny_cl100k_ranks().items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks]
    (directory / "cl100k_base.tiktoken").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="session")
def bge_served(bge_dir, tiktoken_dir, tmp_path_factory) -> Iterator[Served]:
    env = {
        "BGE_EMBED_MODEL": str(bge_dir),
        "BGE_EMBED_MAX_LENGTH": str(BGE_SERVED_MAX_LENGTH),
        "EMBED_TIKTOKEN_DIR": str(tiktoken_dir),
        # Any other encoding is not there: an empty tiktoken cache, and downloads go nowhere.
        "TIKTOKEN_CACHE_DIR": str(tmp_path_factory.mktemp("tiktoken-cache")),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    yield from serve("BgeEmbed", env, tmp_path_factory.mktemp("logs") / "bge_clients.log")
