"""A checkpoint folder with its own tokenizer: text prompts, chat template, decoded text."""
import json
import shutil

import pytest
from conftest import assert_clean_error, run_module


@pytest.fixture(scope="module")
def ckpt_with_tokenizer(tmp_path_factory, tiny_ckpt):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tok") / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    vocab = {f"w{i}": i for i in range(500)}
    vocab["[UNK]"] = 500
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    t.chat_template = "{% for m in messages %}w7 {{ m['content'] }} w8{% endfor %}{% if add_generation_prompt %} w9{% endif %}"
    t.save_pretrained(str(d))
    return d


def test_text_prompt_and_chat(ckpt_with_tokenizer):
    base = ["runtime.generate", "--checkpoint", str(ckpt_with_tokenizer), "--gen-length", "16", "--json"]
    plain = run_module(*base, "--prompt", "w1 w2 w3")
    assert plain.returncode == 0, plain.stderr
    j = json.loads(plain.stdout)
    assert isinstance(j["text"], str) and len(j["tokens"]) <= 16
    ids = run_module(*base, "--prompt-ids", "1,2,3")
    assert json.loads(ids.stdout)["tokens"] == j["tokens"]  # the tokenizer maps w1 w2 w3 to 1, 2, 3
    chat = run_module(*base, "--prompt", "w1 w2 w3", "--chat")
    assert chat.returncode == 0, chat.stderr
    templ = run_module(*base, "--prompt-ids", "7,1,2,3,8,9")
    assert json.loads(chat.stdout)["tokens"] == json.loads(templ.stdout)["tokens"]


def test_chat_without_template_fails_cleanly(tmp_path, ckpt_with_tokenizer):
    d = tmp_path / "c"
    shutil.copytree(ckpt_with_tokenizer, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    proc = run_module("runtime.generate", "--checkpoint", str(d), "--gen-length", "8", "--prompt", "w1", "--chat")
    assert_clean_error(proc, "no chat template")
