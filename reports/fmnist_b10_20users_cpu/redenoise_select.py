"""Post-hoc final candidate selection on a finished attack.py run (B = 10 Fashion-MNIST users, shipped models).

For each user: the run's raw representative image (users/user_XXXX/raw.png, uint8), N = 8 DDIM-10 denoisings from
t_final 100 / 200 / 300 / 400 (seeds 100..107), and the evaluator's class of: candidate 0 (one denoising), the
candidate the server picks by its data term (mean layer cosine distance + mu x output KL, mu = 0 or 1; the score of
UserLevelInversion.selection_scores), and whether any candidate is right. Ground truth enters only the evaluator's
count. Run from the repository root:

    python reports/fmnist_b10_20users_cpu/redenoise_select.py RUN_DIR NUM_USERS [B]
"""
import sys, glob, numpy as np, torch
sys.path.insert(0, ".")
from PIL import Image
from attack import load_victim, VictimSpec, load_prior, PriorSpec, client_update, ThreatSpec
from datamodules.users import FashionMNISTUsers
from lightning_modules.classifier import load_classifier
from lightning_modules.user_level_inversion import UserLevelInversion
torch.set_grad_enabled(True)
run = sys.argv[1]; nusers = int(sys.argv[2]); B = int(sys.argv[3]) if len(sys.argv) > 3 else 10
victim, _ = load_victim(VictimSpec())
prior = load_prior(PriorSpec(), (1, 32, 32))
ev, _ = load_classifier("checkpoints/fashion_mnist/evaluator_convnet")
users = FashionMNISTUsers(num_users=nusers, batch_size=B, seed=0).users()
TF = [100, 200, 300, 400]; N = 8
res = {}
for i, u in enumerate(users):
    x = torch.from_numpy(np.array(Image.open(f"{run}/users/user_{i:04d}/raw.png").convert("L"), dtype=np.float32) / 255.)[None, None]
    view = client_update(victim, u, ThreatSpec(), 10, user_index=i)
    att = UserLevelInversion(use_prior=False, final_denoise=False, output_weight=1.0).bind(view, None)  # pbar recovered
    c = u.dominant_class
    for tf in TF:
        gens = [torch.Generator().manual_seed(100 + k) for k in range(N)]
        with torch.no_grad():
            cands = prior.denoise(x.expand(N, -1, -1, -1), tf, "ddim", 10, generator=gens)
            evc = torch.softmax(ev(cands), 1).argmax(1)
        sc = {}
        for mu in (0.0, 1.0):
            s = []
            for xc in cands:
                d, lg = att.layer_distances(xc[None])
                s.append(float(d.mean()) + mu * float(att.output_loss(xc[None], lg)[0]))
            sc[mu] = int(torch.tensor(s).argmin())
        r = res.setdefault(tf, {"seed0": 0, "sel0": 0, "sel1": 0, "any": 0, "frac": 0.0})
        r["seed0"] += int(evc[0] == c); r["sel0"] += int(evc[sc[0.0]] == c); r["sel1"] += int(evc[sc[1.0]] == c)
        r["any"] += int((evc == c).any()); r["frac"] += float((evc == c).float().mean())
    print(i, c, flush=True)
for tf, r in res.items():
    print(f"t_final {tf}: seed0 {r['seed0']}/{len(users)}  select(mu0) {r['sel0']}  select(mu1) {r['sel1']}  any-of-{N} {r['any']}  mean frac {r['frac']/len(users):.2f}")
