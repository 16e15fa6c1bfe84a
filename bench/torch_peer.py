"""The peer for kd_jax's speed: the distillation recipe kd_jax reimplements, written in PyTorch
as a PyTorch user would run it, on a CPU or a GPU.

Times three training steps at batch 128 on 32x32x3 inputs (fp32, or bf16 autocast with
--autocast bf16; on a CPU, threads = cores):
  teacher_train      CIFAR ResNet-20, cross-entropy, SGD with momentum
  student_offline    the depthwise-separable student, distillation loss against cached teacher
                     logits, Adam
  student_online     the same, with the ResNet-20 teacher's forward (no grad) inside the step
in three variants (eager NCHW, eager channels_last, torch.compile) and prints one JSON line with
images/s for each step and variant, and the best variant per step ("best_*").

Set up once:  python3 -m venv ~/torchref && ~/torchref/bin/pip install torch==2.13.0 numpy
Run:          ~/torchref/bin/python bench/torch_peer.py [--variants eager,channels_last,compile]
                  [--steps 20] [--device cuda] [--autocast bf16]
"""
import contextlib
import argparse, json, time
import torch, torch.nn as nn, torch.nn.functional as F


class DSConv(nn.Module):
  def __init__(self, cin, cout, stride=1):
    super().__init__()
    self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
    self.bn1 = nn.BatchNorm2d(cin)
    self.pw = nn.Conv2d(cin, cout, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)

  def forward(self, x):
    return F.relu(self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))


class Student(nn.Module):  # kd_jax's dsconv_student
  def __init__(self, num_classes=10):
    super().__init__()
    self.features = nn.Sequential(DSConv(3, 64, 2), DSConv(64, 128), DSConv(128, 256))
    self.classifier = nn.Linear(256, num_classes)

  def forward(self, x):
    return self.classifier(self.features(x).mean((2, 3)))


class Block(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); self.b1 = nn.BatchNorm2d(cout)
    self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); self.b2 = nn.BatchNorm2d(cout)
    self.sc = None
    if stride != 1 or cin != cout:
      self.sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    o = F.relu(self.b1(self.c1(x)))
    o = self.b2(self.c2(o))
    return F.relu(o + (x if self.sc is None else self.sc(x)))


class ResNet(nn.Module):  # CIFAR ResNet-(6n+2); n=3 is ResNet-20
  def __init__(self, n=3, widths=(16, 32, 64), num_classes=10):
    super().__init__()
    self.stem = nn.Sequential(
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
    )
    layers, cin = [], widths[0]
    for i, w in enumerate(widths):
      for j in range(n):
        layers.append(Block(cin, w, 2 if (j == 0 and i > 0) else 1)); cin = w
    self.layers = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def distillation_loss(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
  hard = F.cross_entropy(student_logits, labels)
  kl = F.kl_div(
      F.log_softmax(student_logits / temperature, 1),
      F.softmax(teacher_logits / temperature, 1),
      reduction="batchmean",
  )
  return (1 - alpha) * hard + alpha * temperature ** 2 * kl


def time_step(step, steps, sync, warmup=3):
  for _ in range(warmup):
    step()
  sync()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter(); step(); sync(); times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def bench(variant, batch=128, steps=20, device="cpu", autocast="none"):
  torch.manual_seed(0)
  student, teacher = Student().to(device), ResNet().to(device)
  x = torch.randn(batch, 3, 32, 32, device=device)
  y = torch.randint(0, 10, (batch,), device=device)
  cached = torch.randn(batch, 10, device=device)
  # A GPU runs ahead of Python: each timed step waits for it.
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  # bf16: forward and loss under autocast, float32 weights and optimiser (mixed precision).
  mixed = lambda: (torch.autocast(device, dtype=torch.bfloat16) if autocast == "bf16"
                   else contextlib.nullcontext())
  if variant in ("channels_last", "compile"):
    student = student.to(memory_format=torch.channels_last)
    teacher = teacher.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  s_fwd, t_fwd = student, teacher
  if variant == "compile":
    s_fwd, t_fwd = torch.compile(student), torch.compile(teacher)
  out = {}
  # teacher training step
  teacher.train()
  t_opt = torch.optim.SGD(teacher.parameters(), 0.1, momentum=0.9)
  def teacher_step():
    with mixed():
      loss = F.cross_entropy(t_fwd(x), y)
    t_opt.zero_grad(); loss.backward(); t_opt.step()
  out["teacher_train"] = batch / time_step(teacher_step, steps, sync)
  teacher.eval(); student.train()
  s_opt = torch.optim.Adam(student.parameters(), 1e-3)
  def offline_step():
    with mixed():
      loss = distillation_loss(s_fwd(x), cached, y)
    s_opt.zero_grad(); loss.backward(); s_opt.step()
  out["student_offline"] = batch / time_step(offline_step, steps, sync)
  def online_step():
    with torch.no_grad(), mixed():
      t = t_fwd(x)
    with mixed():
      loss = distillation_loss(s_fwd(x), t, y)
    s_opt.zero_grad(); loss.backward(); s_opt.step()
  out["student_online"] = batch / time_step(online_step, steps, sync)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variants", default="eager,channels_last,compile")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
  ap.add_argument("--autocast", default="none", choices=["none", "bf16"])
  a = ap.parse_args()
  res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": a.batch,
         "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
         "autocast": a.autocast}
  for v in a.variants.split(","):
    for k, ips in bench(v, a.batch, a.steps, a.device, a.autocast).items():
      res[f"{k}_img_s_{v}"] = round(ips, 1)
  for k in ("teacher_train", "student_offline", "student_online"):
    res[f"best_{k}_img_s"] = max(val for key, val in res.items() if key.startswith(k + "_img_s_"))
  print(json.dumps(res))


if __name__ == "__main__":
  main()
