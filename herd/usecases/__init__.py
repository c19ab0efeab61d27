"""Use cases on top of a trained model: `herd vqa`, `herd ask-repo`, `herd summarize`.

Each is one module with a library function (vqa, ask_repo, summarize_text) and its subcommand;
herd/usecases/score.py scores ask-repo and summarize on held-out stdlib code (`herd score-usecases`);
herd/usecases/common.py loads the model and asks one chat turn. This package sits above
inference and evaluation (tests/test_layering.py) and is imported only by the CLI and the speedrun.
"""


def add_usecase_subcommands(sub) -> None:
    from herd.usecases import ask_repo, score, summarize, vqa

    for m in (vqa, ask_repo, summarize, score):
        m.add_subcommand(sub)
