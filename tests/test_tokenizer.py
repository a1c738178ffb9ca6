"""Text in, text out: a checkpoint's tokenizer.json and chat template (models.tokenizer) and the main job's
``--text`` / ``--chat``. The tokenizer is a tiny byte-level BPE trained here with the ``tokenizers`` library;
the reference is that library itself (and transformers, where it is installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest
from model_fixtures import llama_config

import models
from models.generate import main as generate_main
from models.tokenizer import Tokenizer, generation_eos_token_ids

tokenizers = pytest.importorskip("tokenizers", reason="the text extra is not installed: pip install -e '.[text]'")

SPECIALS = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
CORPUS = ["The capital of France is Paris.", "hello world, hello there", "Ünïcode tëxt is ok?", "a zebra ."]
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "{% if message['role'] == 'system' %}\n"
    "{{ raise_exception('this template has no system role') }}\n"
    "{% endif %}\n"
    "<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|assistant|>\n"
    "{% endif %}\n"
)


def expected_chat(content: str) -> str:
    """TEMPLATE rendered by hand, as jinja2 with trim_blocks and lstrip_blocks renders it."""
    return f"<s><|user|>\n{content}</s>\n<|assistant|>\n"


def write_tokenizer(path, *, config: dict | None = None, template: str | None = TEMPLATE) -> tokenizers.Tokenizer:
    """A byte-level BPE (as Llama 3 and SmolLM2 use) with a BOS post-processor, and tokenizer_config.json."""
    from tokenizers import decoders, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>", "__type": "AddedToken"}, "unk_token": None}
    if template is not None:
        cfg["chat_template"] = template
    cfg.update(config or {})
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return tok


def random_text(rng) -> str:
    words = [*" ".join(CORPUS).split(), "zebra", "日本", "naïve", "x\ty", "new\nline"]
    return " ".join(rng.choice(words, int(rng.integers(1, 9))).tolist())


def test_round_trip_and_the_post_processor(tmp_path, rng):
    ref = write_tokenizer(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == ref.get_vocab_size() == 300
    bos = ref.token_to_id("<s>")
    for _ in range(20):
        text = random_text(rng)
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids and ids[0] == bos
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_chat_template_renders_as_transformers_does(tmp_path, rng):
    ref = write_tokenizer(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    text = random_text(rng)
    assert tok.apply_chat_template([{"role": "user", "content": text}]) == expected_chat(text)
    ids = tok.encode_chat([{"role": "user", "content": text}])
    assert ids == ref.encode(expected_chat(text), add_special_tokens=False).ids
    assert ids.count(ref.token_to_id("<s>")) == 1  # the template's BOS, not a second one
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert no_prompt == "<s><|user|>\nhi</s>\n"
    with pytest.raises(ValueError, match=r"the chat template failed: this template has no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


@pytest.mark.parametrize(
    ("template", "rendered"),
    [
        ("{{ messages[0]['content'] | tojson }}", '"<b>Ünï</b>"'),  # non-ASCII and <> kept, as transformers
        ("{% generation %}{{ messages[0]['content'] }}{% endgeneration %}", "<b>Ünï</b>"),
        ("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{% endfor %}ok", "ok"),
        ("{{ strftime_now('%Y') | length }}", "4"),
    ],
)
def test_the_template_environment(tmp_path, template, rendered):
    write_tokenizer(tmp_path, template=template)
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "<b>Ünï</b>"}]) == (
        rendered
    )


def test_template_sources_and_errors(tmp_path):
    write_tokenizer(tmp_path, template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([]) == "D"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([]) == "J"
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}jinja")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([]) == "</s>jinja"
    write_tokenizer(tmp_path / "none", template=None)
    with pytest.raises(ValueError, match=r"the checkpoint has no chat template"):
        Tokenizer.from_pretrained(tmp_path / "none").apply_chat_template([])
    write_tokenizer(tmp_path / "escape", template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(ValueError, match=r"the chat template failed: access to attribute '__class__' .* is unsafe"):
        Tokenizer.from_pretrained(tmp_path / "escape").apply_chat_template([])
    write_tokenizer(tmp_path / "syntax", template="{% for %}")
    with pytest.raises(ValueError, match=r"the chat template does not parse"):
        Tokenizer.from_pretrained(tmp_path / "syntax").apply_chat_template([])
    write_tokenizer(tmp_path / "bad", template=7)
    with pytest.raises(ValueError, match=r"the chat template in .*bad is not a string: 7"):
        Tokenizer.from_pretrained(tmp_path / "bad")


def test_clean_up_tokenization_spaces(tmp_path):
    write_tokenizer(tmp_path, config={"clean_up_tokenization_spaces": True})
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.decode(tok.encode("a zebra . is it ?")) == "a zebra. is it?"
    write_tokenizer(tmp_path / "off")
    tok = Tokenizer.from_pretrained(tmp_path / "off")
    assert tok.decode(tok.encode("a zebra . is it ?")) == "a zebra . is it ?"


def test_tokenizer_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in"):
        Tokenizer.from_pretrained(tmp_path)
    write_tokenizer(tmp_path / "other")
    (tmp_path / "mine").mkdir()
    os.symlink(tmp_path / "other" / "tokenizer.json", tmp_path / "mine" / "tokenizer.json")
    with pytest.raises(ValueError, match=r"'tokenizer.json' in .*mine is a symlink to .*, outside the checkpoint"):
        Tokenizer.from_pretrained(tmp_path / "mine")
    os.remove(tmp_path / "mine" / "tokenizer.json")
    os.mkfifo(tmp_path / "mine" / "tokenizer.json")  # read with O_NONBLOCK and fstat first: no hang
    with pytest.raises(ValueError, match=r"'tokenizer.json' in .*mine is a FIFO; expected a regular file"):
        Tokenizer.from_pretrained(tmp_path / "mine")
    os.remove(tmp_path / "mine" / "tokenizer.json")
    (tmp_path / "mine" / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"cannot read tokenizer.json in .*mine"):
        Tokenizer.from_pretrained(tmp_path / "mine")


def test_generation_eos_token_ids(tmp_path):
    assert generation_eos_token_ids(tmp_path) == ()
    for eos, want in ((2, (2,)), ([7, 9], (7, 9)), (None, ())):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        assert generation_eos_token_ids(tmp_path) == want
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    with pytest.raises(ValueError, match=r"expected eos_token_id to be token ids, got \['x'\]"):
        generation_eos_token_ids(tmp_path)


def test_matches_transformers(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(os.fspath(tmp_path))
    ours = Tokenizer.from_pretrained(tmp_path)
    for _ in range(10):
        text = random_text(rng)
        assert ours.encode(text) == theirs(text)["input_ids"]
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        chat = [{"role": "user", "content": text}]
        assert ours.apply_chat_template(chat) == theirs.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        want = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ours.encode_chat(chat) == list(want)


# python -m models.generate --text / --chat ---------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("text-llama")
    config = llama_config(vocab_size=320, eos_token_id=None)
    models.write_checkpoint(path, config, models.random_checkpoint(config, seed=3))
    ref = write_tokenizer(path)
    return path, ref


def _outputs(stdout: str) -> list[tuple[list[int], list[int], str, str]]:
    """(prompt ids, new ids, prompt text, output text) per prompt, as the main job prints them."""
    pattern = r"prompt \d+ \(\d+ tokens\): (\[.*\])\n  -> (\[.*\])\n  prompt text: (.*)\n  output text: (.*)\n"
    return [tuple(json.loads(g) for g in m.groups()) for m in re.finditer(pattern, stdout)]


def test_the_main_job_speaks_text(checkpoint, rng, capsys):
    path, ref = checkpoint
    texts = [random_text(rng), random_text(rng)]
    args = ["--checkpoint", str(path), "--tp", "2", "--dp", "1", "--max-new-tokens", "5"]
    assert generate_main([*args, "--text", texts[0], "--text", texts[1]]) == 0
    out = _outputs(capsys.readouterr().out)
    assert len(out) == 2
    for text, (prompt, new, prompt_text, output_text) in zip(texts, out, strict=True):
        assert prompt == ref.encode(text).ids and prompt_text == "<s>" + text
        assert len(new) == 5 and output_text == ref.decode(new, skip_special_tokens=True)
    assert generate_main([*args, "--chat", "--text", texts[0]]) == 0
    ((prompt, new, prompt_text, output_text),) = _outputs(capsys.readouterr().out)
    assert prompt == ref.encode(expected_chat(texts[0]), add_special_tokens=False).ids
    assert prompt_text == expected_chat(texts[0]) and output_text == ref.decode(new, skip_special_tokens=True)


def test_the_main_job_stops_at_the_generation_config_eos(checkpoint, capsys, tmp_path):
    path, _ = checkpoint
    args = ["--checkpoint", str(path), "--tp", "2", "--dp", "1", "--max-new-tokens", "6", "--prompt", "5,6,7"]
    assert generate_main(args) == 0
    (free,) = re.findall(r"-> (\[.*\])", capsys.readouterr().out)
    first = json.loads(free)[0]
    mine = tmp_path / "eos"
    shutil.copytree(path, mine)
    (mine / "generation_config.json").write_text(json.dumps({"eos_token_id": [first]}))
    assert generate_main([*args[:1], str(mine), *args[2:]]) == 0
    (stopped,) = re.findall(r"-> (\[.*\])", capsys.readouterr().out)
    assert json.loads(stopped) == [first]


def test_text_flag_errors(checkpoint, tmp_path, capsys, monkeypatch):
    path, _ = checkpoint
    with pytest.raises(SystemExit) as e:
        generate_main(["--text", "hi"])
    assert e.value.code == 2 and "--text needs a checkpoint with tokenizer.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        generate_main(["--checkpoint", str(path), "--chat"])
    assert e.value.code == 2 and "--chat renders --text prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        generate_main(["--checkpoint", str(path), "--text", "a", "--prompt", "1"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    config = llama_config()  # vocab 250 < the tokenizer's 300
    models.write_checkpoint(tmp_path, config, models.random_checkpoint(config))
    base = ["--checkpoint", str(tmp_path), "--tp", "2", "--dp", "1"]
    cases = [
        ([], r"--text: no tokenizer.json in .*; pass token ids with --prompt instead"),
        (["tok"], r"--text 'Paris' encodes to id \d+, outside the model's vocabulary of 250"),
        (["tok", "--chat", "nochat"], r"--text: Tokenizer.apply_chat_template: the checkpoint has no chat template"),
        (["tok", "no-tokenizers"], r"--text: Tokenizer.from_pretrained needs the tokenizers package: pip install"),
    ]
    for extra, message in cases:
        if "tok" in extra:
            write_tokenizer(tmp_path, template=None if "nochat" in extra else TEMPLATE)
        if "no-tokenizers" in extra:
            monkeypatch.setitem(sys.modules, "tokenizers", None)
        flags = [x for x in extra if x.startswith("--")]
        assert generate_main([*base, *flags, "--text", "Paris"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
