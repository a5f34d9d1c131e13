#!/usr/bin/env python3
"""Write the Hugging Face `tokenizers` golden files for transformer/tokenizer_test.go.

Usage:
    python3 scripts/reference/tokenizer_golden.py --shared ../shared --out testdata/tokenizer

Needs only the `tokenizers` package (transformers, when present, is used for
an optional cross-check that is recorded but never required).

Two tokenizers:
  gpt2       the real GPT-2 files shared/reference/tokenizers/gpt2/{vocab.json,
             merges.txt}, assembled as GPT2TokenizerFast's tokenizer.json does:
             BPE model, ByteLevel pre-tokenizer (add_prefix_space=False,
             use_regex=True), ByteLevel decoder, "<|endoftext|>" special.
  gutenberg  the fixture models' shared/models/gutenberg-gpt2-7m/tokenizer.json,
             loaded as is.

Written into --out:
  <tokenizer>-<text>.json   for text in wikitext-test, gutenberg-valid: the ids
      of encode(whole file as UTF-8, add_special_tokens=False): their count,
      the sha256 of the ids as little-endian int32, the sha256 of each block of
      BLOCK_SIZE ids (so a Go mismatch can be located), the first and last
      EDGE_IDS ids.
  cases-<tokenizer>.json    short tricky strings with their full ids, and
      decode cases (ids whose bytes are invalid UTF-8) with HF's decode.
  cases-gutenberg-digits.json  the same strings through the fixture tokenizer
      with its pre-tokenizer replaced by Sequence[Digits(individual_digits),
      ByteLevel] (SmolLM2's arrangement), to check digit splitting.
Each file is written atomically (temp file + rename).
"""

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile

BLOCK_SIZE = 65536
EDGE_IDS = 2000
EOT = "<|endoftext|>"

TEXT_FILES = {
    "wikitext-test": "data/wikitext-test.txt",
    "gutenberg-valid": "data/gutenberg-valid.txt",
}

# Short strings that exercise every branch of the GPT-2 pre-tokenizer regex
# and the added-token split. Kept ASCII-escaped in the JSON (ensure_ascii).
CASES = [
    "",
    "Hello world",
    " the",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they'd've done it; we're here, I've got it, 'tis.",
    "don't DON'T 'S 's '' ''s",
    "She said: 'hello'.",
    "!'s ?'ll x's",
    "a  b",
    "a   b",
    "a\n\nb",
    "a \n b",
    "a \nb",
    "\t\tx",
    " \tx",
    "x\t",
    "trailing spaces   ",
    "trailing newline\n",
    "   leading",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "mixed   \n\t  whitespace  \n\n  end",
    "\r\nwindows\r\nline\r\n",
    "numbers 12345 and 3.14 and 1,000,000 and 007",
    "digits in words: abc123def 4x4 x2",
    "unicode numbers: \u0663\u0664 \u216b \u00bd \u2460 \uff11\uff12",
    "naïve café résumé Ελληνικά русский 日本語 한국어 עברית العربية",
    "combining: e\u0301 a\u0308",
    "emoji: 😀👍🏽 🇫🇷 👨‍👩‍👧",
    "symbols: $100.00 €5 £3 ©®™ ±×÷ ≤≥ ←→",
    "punct!!! ??? ... --- ___ *** ### @@@",
    "x" + EOT + "y",
    " " + EOT + " ",
    EOT,
    EOT + EOT,
    "Hello" + EOT + "\n\nWorld " + EOT,
    "<|endoftext",
    "<|endoftext|",
    "endoftext|>",
    "<|endoftext|>>",
    "<<|endoftext|>",
    "nbsp:\u00a0x \u00a0 y\u00a0\u00a0z",
    "ideographic\u3000space and\u2003em space",
    "line\u2028sep\u2029para\u0085nel",
    "info seps:\x1c\x1d\x1e\x1fend",
    "controls:\x00\x01\x07\x7f\x1b[0m",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "ĠĠ âĢ Ċ",
    "a" * 300,
    "=" * 500,
    " " + "ab" * 200,
    "🙂" * 40,
    "Mr. O'Neil's 1990s-era café—“quoted”—and ‘single’…",
    " = Valkyria Chronicles III = \n",
    "@-@ 3 @,@ 000 @.@ 5",
]

# Byte sequences whose decode exercises invalid UTF-8 (each byte becomes its
# one-byte token), with Python's bytes.decode(errors="replace") alongside.
DECODE_BYTES = [
    [0xE2, 0x82],                    # truncated 3-byte sequence
    [0xE2, 0x82, 0x41],              # truncated, then ASCII
    [0xFF],                          # never valid
    [0x80],                          # lone continuation byte
    [0x41, 0x80, 0x80, 0x42],        # two lone continuation bytes
    [0xC0, 0x80],                    # overlong NUL
    [0xED, 0xA0, 0x80],              # UTF-8-encoded surrogate
    [0xF0, 0x9F, 0x98],              # truncated emoji
    [0xF0, 0x9F, 0x98, 0x80],        # complete emoji, byte by byte
    [0xF4, 0x90, 0x80, 0x80],        # above U+10FFFF
    [0xE0, 0x80, 0xAF],              # overlong slash
    [0xF8, 0x88, 0x80, 0x80, 0x80],  # 5-byte form
    [0xC3, 0xA9, 0xC3],              # é then a truncated é
]


def bytes_to_unicode():
    """GPT-2's byte → character table (openai/gpt-2 encoder.py)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def ids_sha256(ids):
    """sha256 hex of the ids as little-endian int32."""
    h = hashlib.sha256()
    for start in range(0, len(ids), BLOCK_SIZE):
        chunk = ids[start:start + BLOCK_SIZE]
        h.update(struct.pack("<%di" % len(chunk), *chunk))
    return h.hexdigest()


def block_sha256s(ids):
    return [ids_sha256(ids[start:start + BLOCK_SIZE]) for start in range(0, len(ids), BLOCK_SIZE)]


def write_json_atomic(path, obj):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; goldens are ordinary files
        with os.fdopen(fd, "w", encoding="ascii") as f:
            json.dump(obj, f, ensure_ascii=True, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print("wrote", path, flush=True)


def read_text(path):
    # newline="" keeps "\r\n" as is: the Go side reads raw bytes.
    with open(path, "r", encoding="utf-8", newline="") as f:
        return f.read()


def load_gpt2(shared):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    directory = os.path.join(shared, "reference", "tokenizers", "gpt2")
    bpe = models.BPE.from_file(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    assert tok.token_to_id(EOT) == 50256, tok.token_to_id(EOT)
    return tok


def load_gutenberg(shared):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(shared, "models", "gutenberg-gpt2-7m", "tokenizer.json"))


def load_gutenberg_digits(shared):
    from tokenizers import Tokenizer
    with open(os.path.join(shared, "models", "gutenberg-gpt2-7m", "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    return Tokenizer.from_str(json.dumps(spec))


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def crosscheck_transformers(shared, name, text, ids):
    """Encode with transformers' own GPT-2 / auto tokenizer if it loads here.

    Recorded in the golden file; a failure to load is not an error, a
    different result is reported loudly (and recorded) but not fatal.
    """
    try:
        import transformers
        if name == "gpt2":
            # A folder with vocab.json + merges.txt, as the hub's gpt2 has.
            cls = getattr(transformers, "GPT2TokenizerFast", None) or transformers.GPT2Tokenizer
            hf = cls.from_pretrained(os.path.join(shared, "reference", "tokenizers", "gpt2"))
        else:
            hf = transformers.AutoTokenizer.from_pretrained(os.path.join(shared, "models", "gutenberg-gpt2-7m"))
        what = "transformers %s %s" % (transformers.__version__, type(hf).__name__)
        other = hf.encode(text, add_special_tokens=False)
    except Exception as exc:  # noqa: BLE001 — any failure just means "not checked"
        return "not checked: %s: %s" % (type(exc).__name__, str(exc)[:200])
    if not other and ids:
        # A tokenizer that loaded without its vocabulary proves nothing.
        return "not checked: %s produced no ids (vocabulary size %d)" % (what, len(hf))
    if list(other) == list(ids):
        return "identical ids from " + what
    first = next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))
    msg = "MISMATCH with %s: %d vs %d ids, first difference at %d" % (what, len(ids), len(other), first)
    print("WARNING:", name, msg, file=sys.stderr, flush=True)
    return msg


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", required=True, help="the shared/ fixtures folder")
    parser.add_argument("--out", required=True, help="output folder (testdata/tokenizer)")
    parser.add_argument("--no-crosscheck", action="store_true", help="skip the transformers cross-check")
    args = parser.parse_args()

    import tokenizers
    version = tokenizers.__version__
    byte_char = bytes_to_unicode()

    tokenizers_by_name = {"gpt2": load_gpt2(args.shared), "gutenberg": load_gutenberg(args.shared)}
    for name, tok in tokenizers_by_name.items():
        for text_name, rel in TEXT_FILES.items():
            path = os.path.join(args.shared, rel)
            with open(path, "rb") as f:
                raw = f.read()
            text = read_text(path)
            assert text.encode("utf-8") == raw, "%s does not round-trip through UTF-8" % path
            ids = encode(tok, text)
            record = {
                "tokenizer": name,
                "text_file": rel,
                "text_sha256": hashlib.sha256(raw).hexdigest(),
                "tokenizers_version": version,
                "num_ids": len(ids),
                "ids_sha256": ids_sha256(ids),
                "block_size": BLOCK_SIZE,
                "block_sha256": block_sha256s(ids),
                "first_ids": ids[:EDGE_IDS],
                "last_ids": ids[-EDGE_IDS:],
                "decode_roundtrip": tok.decode(ids, skip_special_tokens=False) == text,
            }
            if not args.no_crosscheck:
                record["transformers_crosscheck"] = crosscheck_transformers(args.shared, name, text, ids)
            write_json_atomic(os.path.join(args.out, "%s-%s.json" % (name, text_name)), record)

    tokenizers_by_name["gutenberg-digits"] = load_gutenberg_digits(args.shared)
    for name, tok in tokenizers_by_name.items():
        cases = [{"text": text, "ids": encode(tok, text)} for text in CASES]
        decodes = []
        for seq in DECODE_BYTES:
            ids = [tok.token_to_id(byte_char[b]) for b in seq]
            assert all(i is not None for i in ids), (name, seq)
            decodes.append({
                "bytes": seq,
                "ids": ids,
                "text": tok.decode(ids, skip_special_tokens=False),
                "python_replace": bytes(seq).decode("utf-8", errors="replace"),
            })
        # Special token between ordinary ones, and an invalid byte after it.
        mixed = encode(tok, "a") + [tok.token_to_id(EOT)] + encode(tok, "b") + [tok.token_to_id(byte_char[0xE2])]
        decodes.append({"bytes": None, "ids": mixed, "text": tok.decode(mixed, skip_special_tokens=False),
                        "python_replace": None})
        write_json_atomic(os.path.join(args.out, "cases-%s.json" % name), {
            "tokenizer": name,
            "tokenizers_version": version,
            "eos_id": tok.token_to_id(EOT),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "encode": cases,
            "decode": decodes,
        })


if __name__ == "__main__":
    main()
