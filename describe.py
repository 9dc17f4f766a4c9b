"""Class descriptions from an LLM, for DUAL-PT's distillation loss: \
python describe.py --classes FILE --out FILE

Hu et al., "Context-Aware Prompt Tuning for Vision-Language Model with Dual-Alignment" (DUAL-PT,
dualpt.py) pull the learned prompts toward a large language model's short descriptions of each
class. This asks the paper's question (its Eq. 3) for every class, of any OpenAI-compatible chat
endpoint (the key from OPENAI_API_KEY), keeps the "- " lines of each answer, and writes
{class name: [description, ...]}: the file dualpt.py reads with `--set descriptions=FILE`. The file
is rewritten atomically after every class, so a rerun asks only for the classes still missing.
Standard library only: no torch.
"""
import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

QUESTION = ("What are the useful features for distinguishing a {} in a photo? "
            "Please just give me a list of short phrases.")  # the paper's, Eq. 3

# dualpt.py has the same 10 lines: importing it would load torch here
def load_json(path, kind, what):
    """A JSON file's content if it is of type `kind`, else a ValueError that says what the file
    should hold."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror}): expected {what}") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}): expected {what}") from None
    if not isinstance(content, kind):
        raise ValueError(f"{path} holds a JSON {type(content).__name__}: expected {what}")
    return content

def ask(api_base, model, classname):
    """The paper's question for one class -> its "- " answer lines, from an OpenAI-compatible chat
    endpoint."""
    url = api_base.rstrip("/") + "/chat/completions"
    body = {"model": model, "temperature": 0.7,
            "messages": [{"role": "user", "content": QUESTION.format(classname)}]}
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), headers),
                                    timeout=120) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url} answered HTTP {e.code} for {classname!r}: {e.read()[:200]!r} "
                         "(check --model and OPENAI_API_KEY)") from None
    except OSError as e:
        raise ValueError(f"cannot reach {url} ({e}): check --api-base") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"{url} did not answer as an OpenAI-compatible chat endpoint: "
                         "check --api-base") from None
    phrases = [line.strip()[2:].strip() for line in str(answer).splitlines()
               if line.strip().startswith("- ")]
    if not phrases:
        raise ValueError(f"the answer for {classname!r} has no '- ' lines: {str(answer)[:100]!r}")
    return phrases

def describe(args):
    """Ask for every class not yet in --out; the file is rewritten atomically after each, so a rerun
    resumes."""
    names, out = Path(args.classes), Path(args.out)
    if not names.is_file():
        raise ValueError(f"no file at --classes {names}: give a file of class names, one a line "
                         "or a JSON list")
    # before the first (paid) answer, which could not be kept
    if not out.parent.is_dir() or out.is_dir():
        raise ValueError(f"--out {out}: "
                         f"{'is a folder' if out.is_dir() else f'no folder {out.parent}'}; give a "
                         "file in an existing folder")
    text = names.read_text(encoding="utf-8")
    classes = (load_json(names, list, "a list of class names") if text.lstrip().startswith("[")
               else text.splitlines())
    done = load_json(out, dict, "descriptions {class: [description, ...]}") if out.exists() else {}
    have = {str(k).replace("_", " ").strip().lower() for k in done}
    for c in [str(c).strip() for c in classes if str(c).strip()]:
        if c.replace("_", " ").lower() in have:
            continue
        done[c] = ask(args.api_base, args.model, c.replace("_", " "))
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(done, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, out)  # whole or not at all
        print(f"{c}: {len(done[c])} phrases", flush=True)
    print(f"{len(done)} classes in {out}")
    return 0

def main(argv=None):
    p = argparse.ArgumentParser(
        description="class descriptions from an LLM, for DUAL-PT's L_LLM (dualpt.py)")
    p.add_argument("--classes", required=True,
                   help="file of class names: one a line, or a JSON list")
    p.add_argument("--out", required=True,
                   help="JSON {class: [description, ...]}; existing classes are kept")
    p.add_argument("--api-base", default="https://api.openai.com/v1",
                   help="any OpenAI-compatible endpoint")
    p.add_argument("--model", default="gpt-3.5-turbo", help="the paper's: GPT-3.5")
    args = p.parse_args(argv)
    try:
        return describe(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the reader of the progress lines went away (`| head`): --out keeps what was answered
    except BrokenPipeError:
        # as methods.output_closed (no torch here)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: the output was closed; {args.out} keeps the classes answered so far, "
              "and a rerun asks for the rest", file=sys.stderr)
        return 141  # 128 + SIGPIPE, as train.py's stopped run: the work did not finish
    except OSError as e:  # --out cannot be written: the answers before this one are in it
        print(f"error: cannot write {args.out} ({e.strerror or e}); a rerun asks only for the "
              "classes missing there", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.out} keeps the classes answered so far, and a rerun asks "
              "for the rest", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
