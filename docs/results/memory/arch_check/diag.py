import sys, torch
torch.set_num_threads(1)
from effattn.bench.train import train_mqar
m = sys.argv[1]; kw = eval(sys.argv[2]); steps = int(sys.argv[3]) if len(sys.argv) > 3 else 600
r = train_mqar(m, 64, heads=8, vocab_size=34, seq_len=32, num_kv_pairs=[2, 4, 8], num_train=24000, num_test=256,
               steps=steps, batch_size=32, lr=1e-3, weight_decay=0.0, random_non_queries=False, seed=0, mixer_kw=kw,
               early_stop=0.99)
print(m, kw, "acc %.3f loss %.3f steps %d s %.0f" % (r["accuracy"], r["final_loss"], r["steps_run"], r["train_s"]), r.get("accuracy_by_pairs"), flush=True)
