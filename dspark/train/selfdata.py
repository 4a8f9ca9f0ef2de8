"""Training data the target writes itself: instruction prompts, the target's own answers, token arrays.

Drafters learn to predict what the *target* writes, so (as the DSpark paper trains on target-regenerated
responses) the data is the target's greedy answers to instruction prompts, generated here with dspark's own
batched generation over a bundle of that target (an int4 bundle is fast and answers almost as the fp32 one).

Prompts are derived from material on this machine (``instruction_prompts``):

- the Python standard library: for each public function with a docstring, and each documented public method of a
  public class, "write this function", "explain this code" and "show how to use it"; for each module a request to
  explain it;
- general questions: a fixed list of topics crossed with a few question forms.

Held-out prompts never share a source with training prompts: stdlib prompts are split by the hash of their file
(the corpus split, ``corpus.held_out``), general ones by the hash of their topic. Answers are appended to
``responses.jsonl`` as they finish, so an interrupted run resumes where it stopped; ``write_tokens`` turns the
answers into ``train.npy`` / ``heldout.npy`` (rendered prompt + answer + end of turn, one document after
another) with ``*_answers.npy`` masks of the answer tokens (drafter training anchors its blocks there, where
drafting happens), the arrays ``dspark train-draft`` reads, and ``heldout_prompts.jsonl`` for ``dspark bench
--prompts``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dspark.errors import DsparkError
from dspark.train.corpus import collect

RESPONSES = "responses.jsonl"
HELD_OUT_FRACTION = 0.05
MAX_SOURCE_LINES = 30  # an "explain this code" prompt quotes at most this many lines

TOPICS = (
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "machine learning",
    "compound interest", "the immune system", "climate change", "plate tectonics", "the Roman Empire",
    "public-key cryptography", "how vaccines work", "supply and demand", "the theory of evolution",
    "the internet", "electric cars", "the human brain", "renewable energy", "the stock market", "DNA",
    "the Industrial Revolution", "volcanoes", "sleep", "the Moon landing", "inflation", "recycling",
    "the periodic table", "gravity", "the printing press", "coffee", "bees and pollination", "the Olympic Games",
    "meditation", "the Great Wall of China", "earthquakes", "antibiotics", "the speed of light", "democracy",
    "the Renaissance", "ocean currents", "healthy eating", "learning a new language", "time management",
    "public speaking", "writing a good essay", "the solar system", "rainbows", "batteries", "3D printing",
    "blockchain", "quantum computers", "the greenhouse effect", "wind turbines", "the heart", "chess",
    "version control with git", "unit testing", "recursion", "hash tables", "sorting algorithms",
    "binary search", "object-oriented programming", "functional programming", "databases and SQL",
    "regular expressions", "HTTP and web servers", "operating systems", "compilers", "computer memory",
    "floating-point numbers", "concurrency and threads", "the Linux command line", "JSON", "APIs",
    "cloud computing", "password security", "data visualization", "statistics and averages",
    "probability", "prime numbers", "the Pythagorean theorem", "fractions", "exercise", "gardening",
    "saving money", "job interviews", "friendship", "dinosaurs", "rain forests", "deserts", "glaciers",
)

QUESTION_FORMS = (
    "Explain {topic} in simple terms.",
    "What are the most important facts about {topic}?",
    "Write a short paragraph about {topic} for a ten-year-old.",
    "Give me three questions and answers about {topic}.",
    "What are common misconceptions about {topic}?",
    "Summarize the key ideas of {topic} in a few bullet points.",
    "Write a short story that teaches something about {topic}.",
    "What is the history of {topic}?",
    "How would you teach {topic} to a beginner? Give a step-by-step plan.",
    "What are the pros and cons of {topic}?",
    "Write a quiz with five multiple-choice questions about {topic}, with the answers.",
    "Explain {topic} to an expert in one detailed paragraph.",
)

CODE_FORMS = ("write", "explain", "use")


@dataclass(frozen=True)
class Instruction:
    id: str  # stable: derived from the source, so a resumed run recognises what it has answered
    text: str  # the user message
    domain: str  # "code" or "chat"
    held_out: bool


def _hashed(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _first_sentence(doc: str) -> str:
    line = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    return " ".join(line.split())


def _function_message(form: str, node: ast.FunctionDef, name: str, owner: str, lines: list[str]) -> str:
    if form == "write":
        return (f"Write a Python {owner} `{node.name}({ast.unparse(node.args)})` that does the following: "
                f"{_first_sentence(ast.get_docstring(node))}")
    if form == "explain":
        source = lines[node.lineno - 1 : min(node.end_lineno, node.lineno - 1 + MAX_SOURCE_LINES)]
        # a method is quoted without its class's indentation (a module-level function is left as it is)
        return f"Explain what this Python {owner} does:\n\n```python\n" + textwrap.dedent("\n".join(source)) + "\n```"
    return f"How do I use `{name}` in Python? Show a short example."


def _documented_public(body: list[ast.stmt]) -> list[ast.FunctionDef]:
    return [node for node in body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
            and ast.get_docstring(node)]


def _every_form(kind: str, name: str, node: ast.FunctionDef, lines: list[str], held: bool) -> list[Instruction]:
    """Write, explain and use prompts for one documented function or method. The form a hash of the name picks
    keeps the bare id: answers written when only that form was asked are still recognised by a resumed run."""
    first = int(_hashed(name) * len(CODE_FORMS))
    forms = [CODE_FORMS[(first + k) % len(CODE_FORMS)] for k in range(len(CODE_FORMS))]
    return [Instruction(f"{kind}:{name}" + (f":{form}" if k else ""), _function_message(form, node, name, kind, lines),
                        "code", held) for k, form in enumerate(forms)]


def _code_prompts(module: str, relpath: str, text: str, held: bool) -> list[Instruction]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines()
    out = []
    doc = ast.get_docstring(tree)
    if doc and not module.startswith("_"):
        out.append(Instruction(f"module:{module}", f"What is the Python module `{module}` for? "
                               f"Explain it briefly and show a short example of using it.", "code", held))
    for node in _documented_public(tree.body):
        out += _every_form("function", f"{module}.{node.name}", node, lines, held)
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_"):
            for node in _documented_public(cls.body):
                out += _every_form("method", f"{module}.{cls.name}.{node.name}", node, lines, held)
    return out


def instruction_prompts(root: str | Path | None = None, fraction: float = HELD_OUT_FRACTION) -> list[Instruction]:
    """Every instruction, in a fixed pseudo-random order (any prefix mixes sources), held-out ones included."""
    corpus = collect(root, fraction)
    prompts = []
    for relpath in corpus.train + corpus.held_out:
        module = relpath.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        prompts += _code_prompts(module, relpath, corpus.read(relpath), relpath in corpus.held_out)
    for topic in TOPICS:
        held = _hashed(f"topic:{topic}") < fraction
        for i, form in enumerate(QUESTION_FORMS):
            prompts.append(Instruction(f"topic:{topic}:{i}", form.format(topic=topic), "chat", held))
    unique = {p.id: p for p in prompts}  # a module and a package __init__ can share a name
    return sorted(unique.values(), key=lambda p: _hashed(p.id))


def read_responses(folder: Path) -> dict[str, dict]:
    """Answers already written (a partial last line from an interrupted run is ignored)."""
    path = folder / RESPONSES
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["id"]] = record
    return done


def ends_mid_line(path: Path) -> bool:
    """Whether ``path`` ends in a partial line."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def generate_responses(bundle_dir: str | Path, output: str | Path, *, max_new_tokens: int = 256,
                       held_out: int = 48, limit: int | None = None, minutes: float | None = None,
                       max_batch: int | None = None, threads: int = 0, root: str | Path | None = None,
                       progress: bool = True, log=print, backend: str = "ort", device: str = "cpu") -> dict:
    """Answer instruction prompts with the bundle's target (greedy, plain decoding, continuous batching) on
    ``backend`` / ``device`` (as ``Generator`` takes them).

    The first ``held_out`` held-out prompts are answered first, then training prompts until ``limit`` answers
    or ``minutes`` of wall time in this call (0: none). Answers already in ``output/responses.jsonl`` are skipped."""
    from tqdm import tqdm

    from dspark.runtime.generate import Generator, Request
    from dspark.runtime.tokenizer import ChatTemplate

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    gen = Generator(bundle_dir, backend=backend, threads=threads, use_draft=False, max_batch=max_batch, device=device)
    template = ChatTemplate.load(gen.tokenizer)
    if template is None:
        raise DsparkError(f"{bundle_dir}: the tokenizer has no chat template; instruction data needs a chat model")
    prompts = instruction_prompts(root)
    held = [p for p in prompts if p.held_out][:held_out]
    train = [p for p in prompts if not p.held_out][: limit if limit is not None else None]
    done = read_responses(output)
    todo = [p for p in held + train if p.id not in done]
    log(f"{len(prompts)} instructions ({sum(p.held_out for p in prompts)} held out); answering {len(held)} held-out "
        f"and {len(train)} training ones, {len(done)} already answered, {len(todo)} to go")
    deadline = time.monotonic() + 60 * minutes if minutes is not None else None  # 0: nothing new, arrays only
    written = tokens = 0
    started = time.perf_counter()
    queue = iter(todo)
    live: dict[int, tuple[Instruction, str]] = {}
    too_long: list[str] = []

    def in_time() -> bool:
        return deadline is None or time.monotonic() < deadline

    def refill():
        while len(gen.waiting) < gen.max_batch:
            p = next(queue, None)
            if p is None:
                return
            rendered = template.render([{"role": "user", "content": p.text}])
            ids = gen.tokenizer.encode(rendered, add_special_tokens=False)
            if len(ids) + 1 > gen.bundle.limits.max_context:  # one such prompt must not stop (or block) a long run
                too_long.append(p.id)
                bar.update(1)
                continue
            live[id(gen.submit(Request(ids, max_new_tokens=max_new_tokens)))] = (p, rendered)

    cut = ends_mid_line(output / RESPONSES)
    with (output / RESPONSES).open("a") as sink, tqdm(total=len(todo), desc="answers", unit="answer",
                                                       disable=not progress) as bar:
        if cut:  # a run killed while writing left a partial record: ours start on a line of their own
            sink.write("\n")
        if in_time():
            refill()
        while gen.has_work():
            for seq in gen.step():
                p, rendered = live.pop(id(seq))
                sink.write(json.dumps({"id": p.id, "domain": p.domain, "held_out": p.held_out, "prompt": rendered,
                                       "prompt_ids": seq.request.prompt_ids, "response_ids": seq.generated,
                                       "finish_reason": seq.finish_reason}) + "\n")
                sink.flush()
                written += 1
                tokens += len(seq.generated)
                bar.update(1)
            if in_time():
                refill()
    seconds = time.perf_counter() - started
    summary = {"answers_written": written, "tokens_generated": tokens, "seconds": round(seconds, 1),
               "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
               "answers_total": len(done) + written, "remaining": len(todo) - written - len(too_long)}
    if too_long:
        summary["skipped_longer_than_context"] = len(too_long)
        log(f"skipped {len(too_long)} prompts longer than the bundle's max context "
            f"({gen.bundle.limits.max_context} tokens; re-export with a larger --max-context to answer them), "
            f"for example {too_long[0]}")
    log(json.dumps(summary))
    return summary


def write_tokens(output: str | Path, log=print) -> dict:
    """``train.npy`` / ``heldout.npy`` (uint32 ids: rendered prompt then answer, one document after another), their
    ``*_answers.npy`` (bool: the token is the target's), ``*_docs.npy`` (document starts) and
    ``heldout_prompts.jsonl`` (the held-out prompts as rendered text) from ``responses.jsonl``."""
    output = Path(output)
    done = read_responses(output)
    if not done:
        raise DsparkError(f"{output}/{RESPONSES} holds no answers yet; run the generation first")
    parts: dict[bool, list[list[int]]] = {False: [], True: []}
    written: dict[bool, list[np.ndarray]] = {False: [], True: []}
    prompts = []
    for record in sorted(done.values(), key=lambda r: _hashed(r["id"])):
        # an answer that stopped itself ends with the end-of-turn token; a cut one just ends (the next document
        # starts with the template's turn marker either way)
        parts[record["held_out"]].append(record["prompt_ids"] + record["response_ids"])
        written[record["held_out"]].append(np.repeat([False, True], [len(record["prompt_ids"]),
                                                                     len(record["response_ids"])]))
        if record["held_out"]:
            prompts.append({"prompt": record["prompt"], "domain": record["domain"], "id": record["id"]})
    stats = {}
    for held, name in ((False, "train"), (True, "heldout")):
        if not parts[held]:
            raise DsparkError(f"{output}: no {name} answers yet")
        ids = np.concatenate([np.asarray(d, dtype=np.uint32) for d in parts[held]])
        np.save(output / f"{name}.npy", ids)
        np.save(output / f"{name}_answers.npy", np.concatenate(written[held]))
        # where each document starts: the feature cache runs every document from its own start
        np.save(output / f"{name}_docs.npy", np.cumsum([0] + [len(d) for d in parts[held][:-1]]).astype(np.int64))
        stats[name] = {"documents": len(parts[held]), "tokens": int(ids.size)}
    with (output / "heldout_prompts.jsonl").open("w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    (output / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(json.dumps(stats))
    return stats
