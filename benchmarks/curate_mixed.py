"""``kunlun curate`` on a real mixed corpus, and lingua on short real texts (issue 32).

The corpus: five standard-library packages (email, json, asyncio, xml, concurrent: code plus their text files) and
the Debian GNU/Linux FAQ in English, German, French and Simplified Chinese, one document per section (Debian's
packages debian-faq, debian-faq-de, -fr, -zh-cn; © 1996-2021 Software in the Public Interest, copying, modifying
and translating permitted under the notice at the top of each text). The curation runs with the defaults (local
executor, --similarity 0.7, all languages kept) and its report is saved as results/curate-mixed/curation_report.json.

The short texts: 250 sentences of 20-120 characters per language, drawn from the same FAQ texts (no URLs; Chinese
sentences mostly CJK), classified by lingua as ``kunlun curate`` does (all languages, low-accuracy mode) and in
the other settings; accuracy against the text's language and seconds for the 1,000 are saved as langid.json.

    apt-get install debian-faq debian-faq-de debian-faq-fr debian-faq-zh-cn
    PYTHONPATH=src python benchmarks/curate_mixed.py [--out results/curate-mixed]
    PYTHONPATH=src python benchmarks/curate_mixed.py --report-only   # curation_report.md + plot from the .json
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import random
import re
import sysconfig
import tempfile
import time
from pathlib import Path

FAQ = Path("/usr/share/doc/debian/FAQ")
LANGUAGES = {"en": "en", "de": "de", "fr": "fr", "zh": "zh-cn"}  # ISO 639-1 -> the FAQ file's suffix
STDLIB_PACKAGES = ("email", "json", "asyncio", "xml", "concurrent")
HEADING = re.compile(r"^\d+(?:\.\d+)+\.[ \xa0]\S", re.MULTILINE)  # "2.1. What is ..." at column 0 (the contents indent)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÀ-Ý«“\"])|(?<=[。！？])")  # not "6.0", "e.g. apt"
CJK = re.compile(r"[\u4e00-\u9fff]")


def faq_text(code: str) -> str:
    path = FAQ / f"debian-faq.{LANGUAGES[code]}.txt.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: apt-get install debian-faq debian-faq-de debian-faq-fr debian-faq-zh-cn")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def faq_sections(code: str) -> list[str]:
    """The FAQ in language ``code`` split at its section headings (the first part: title, notice, contents)."""
    text = faq_text(code)
    starts = [m.start() for m in HEADING.finditer(text)]
    parts = (text[a:b].strip() for a, b in zip([0, *starts], [*starts, len(text)], strict=True))
    return [p for p in parts if p]


def _sentences(code: str) -> set[str]:
    joiner = "" if code == "zh" else " "
    out = set()
    for paragraph in re.split(r"\n\s*\n", faq_text(code)):
        flat = joiner.join(line.strip() for line in paragraph.splitlines())
        out.update(s.strip() for s in SENTENCE_END.split(flat))
    return out


def short_texts(code: str, n: int, rng: random.Random) -> list[str]:
    """``n`` sentences of 20-120 characters from the FAQ in ``code``, its hard line wraps undone; in the
    translations, sentences left in English (found verbatim in the English FAQ) are left out."""
    untranslated = _sentences("en") if code != "en" else set()
    sentences = []
    for s in sorted(_sentences(code) - untranslated):
        if not 20 <= len(s) <= 120 or "http" in s or "/" in s or re.search(r"\d\.$", s):  # "… 15.2.": a heading
            continue
        if (len(CJK.findall(s)) / len(s) < 0.5) if code == "zh" else (len(s.split()) < 4 or CJK.search(s)):
            continue
        sentences.append(s)
    return rng.sample(sentences, n)


def write_corpus(root: Path) -> list[str]:
    """The FAQ sections as faq/<lang>.jsonl under ``root``; returns the curate SOURCES (stdlib folders + faq/)."""
    (root / "faq").mkdir(parents=True)
    for code in LANGUAGES:
        with open(root / "faq" / f"{code}.jsonl", "w", encoding="utf-8") as f:
            for i, section in enumerate(faq_sections(code)):
                f.write(json.dumps({"text": section, "id": f"faq-{code}-{i}"}, ensure_ascii=False) + "\n")
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [str(lib / p) for p in STDLIB_PACKAGES] + [str(root / "faq")]


SETTINGS = ("all languages, low accuracy (kunlun curate)", "all languages, high accuracy",
            "en/de/fr/zh, low accuracy", "en/de/fr/zh, high accuracy")


def _classify(setting: str, texts: list[tuple[str, str]]) -> dict:
    """One detector setting on ``texts`` ((language, text) pairs), in a fresh process (lingua caches its models)."""
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    four = [Language.from_iso_code_639_1(getattr(IsoCode639_1, c.upper())) for c in LANGUAGES]
    started = time.perf_counter()
    builder = (LanguageDetectorBuilder.from_all_languages() if setting.startswith("all")
               else LanguageDetectorBuilder.from_languages(*four))
    detector = (builder.with_low_accuracy_mode() if "low" in setting else builder).build()
    detector.compute_language_confidence_values("load the models: 汉字 und Wörter, et des mots")
    loaded = time.perf_counter()
    found = [detector.compute_language_confidence_values(t)[0].language.iso_code_639_1.name.lower()
             for _code, t in texts]
    done = time.perf_counter()
    wrong = [(code, got, t) for (code, t), got in zip(texts, found, strict=True) if got != code]
    return {"setting": setting, "texts": len(texts), "accuracy": round(1 - len(wrong) / len(texts), 4),
            "load_seconds": round(loaded - started, 2), "classify_seconds": round(done - loaded, 2),
            "errors_by_language": {c: sum(w[0] == c for w in wrong) for c in LANGUAGES},
            "error_examples": [{"language": c, "detected": g, "text": t} for c, g, t in wrong[:8]]}


def langid(per_language: int = 250) -> list[dict]:
    """Accuracy and seconds (model load; classifying all texts) of lingua on the short texts, per setting."""
    rng = random.Random(0)
    texts = [(code, t) for code in LANGUAGES for t in short_texts(code, per_language, rng)]
    rows = []
    for setting in SETTINGS:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            rows.append(pool.apply(_classify, (setting, texts)))
        print(f"{setting}: accuracy {rows[-1]['accuracy']:.3f}, load {rows[-1]['load_seconds']} s, "
              f"{len(texts)} texts in {rows[-1]['classify_seconds']} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/curate-mixed", help="where the raw records go")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="rebuild curation_report.md and the plot")
    args = ap.parse_args()
    from kunlunbaize.data.curate.report import REPORT_JSON, write_report

    out = Path(args.out)
    if args.report_only:
        write_report(out, json.loads((out / REPORT_JSON).read_text(encoding="utf-8")))
        return
    from kunlunbaize.data.curate import ExecutorOptions, curate

    out.mkdir(parents=True, exist_ok=True)
    (out / "langid.json").write_text(json.dumps(langid(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_corpus(Path(tmp))
        started = time.perf_counter()
        data = curate(sources, Path(tmp) / "data", vocab_size=2000, executor=ExecutorOptions(workers=args.workers),
                      tasks=2, val_fraction=0, progress=False, log=None)
        wall = time.perf_counter() - started
        report = json.loads((data / REPORT_JSON).read_text(encoding="utf-8"))
    report["seconds_wall"] = round(wall, 2)
    report["settings"]["sources"] = [*(f"$STDLIB/{p}" for p in STDLIB_PACKAGES), "faq/ (Debian FAQ en/de/fr/zh)"]
    write_report(out, report)
    print(f"{out / REPORT_JSON}: curation {report['seconds_curation']} s, whole command {wall:.1f} s")


if __name__ == "__main__":
    main()
