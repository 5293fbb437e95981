"""Tokenizer transfer of one model: student tokenizer -> data -> init -> train -> save -> evaluate.

    python experiments/transfer.py experiment=smoke
    python experiments/transfer.py -m experiment=smoke objective=aim,aim_star objective.n_layers=2,4
    accelerate launch --multi_gpu --num_processes 2 experiments/transfer.py experiment=smoke

See docs/EXPERIMENTS.md.
"""

from matt.hydra_app import transfer

if __name__ == "__main__":
    transfer()
