"""Command lines of one-epoch CPU runs shared by the reliability tests (tiny models, no workers)."""


def pretrain_args(data, out, *extra):
    return ["--model", "mae_vit_tiny_patch16", "--output_dir", str(out), "--data_path_blurred", str(data),
            "--batch_size", "4", "--epochs", "1", "--input_size", "32", "--num_workers", "0", "--device", "cpu",
            "--eval_freq", "1000", *extra]


def finetune_args(data, out, *extra):
    return ["--data_path", str(data), "--output_dir", str(out), "--model", "vit_tiny_patch16", "--input_size", "32",
            "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--n_boot", "0", "--epochs", "1", *extra]
