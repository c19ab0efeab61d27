"""Online RL (post-training II): GRPO-family learning on verifiable prompts that keeps the
medium-to-hard ones, with an asynchronous actor/learner (`herd rl`).

    rewards.py   reward functions with TRL's calling convention (correctness via the chat-data
                 verifiers, format), combined with weights; a raising reward scores None
    loss.py      group advantages and the clipped token-level objective (pure functions)
    pool.py      the prompt pool: pass rate per prompt, states new/hard/unsolved/easy/solved
    actor.py     rollout workers (herd's Engine; prompt images included), the `generate` callable,
                 the staleness buffer
    learner.py   the RL stage on the shared loop: batch source, objective, held-out reward, plot
    launch.py    Ray: the learner and the rollout workers as actors, weights through the object store,
                 worker restarts; the driver draws the progress bar
    weight_sync.py  the broadcast alternative (torch.distributed: gloo on CPU, NCCL on GPUs)
    cli.py       `herd rl`
"""
