"""Independent check of the synthetic BraTS-like brain MRI phantom (``medmim.data.phantom_brain``).

    .venv/bin/python benchmarks/check_brain_phantom.py [--seeds 0 1 2 3 4 5] [--out benchmarks/results/brain-phantom-check.md]

Written from the issue's specification and from what real BraTS 2021 data looks like, not from the
implementation or its tests. It generates a handful of cases at the default 1 mm grid (one case is
~2 s), one at BraTS's own 240x240x155 grid and a few at 2 mm, writes a small dataset twice through
the API and once through the CLI, measures, and writes a Markdown table of every check: the measured
value, the expected relation and PASS/FAIL. ``kind`` says where the expectation comes from:

* SPEC: the issue's specification (a FAIL is a defect of the phantom);
* DOC: a promise of the module's own docstrings;
* REAL: realism by BraTS / adult-anatomy standards, not demanded by the issue (a FAIL is "unrealistic");
* INFO: measured and reported, no pass/fail.

Exit status 1 if any SPEC or DOC check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from medmim.data.phantom import case_seed
from medmim.data.phantom_brain import (BACKGROUND, CSF, DEEP_GM, DEFAULT_SHAPE, ENHANCING, GM, NECROSIS,
                                       OEDEMA, WM, make_brain_phantom, write_brain_phantom_dataset)
from medmim.errors import MedmimError

ROOT = Path(__file__).resolve().parents[1]
SEQ = ("T1", "T1ce", "T2", "FLAIR")
TNAME = {CSF: "CSF", GM: "GM", WM: "WM", DEEP_GM: "deepGM", OEDEMA: "ED", NECROSIS: "NCR", ENHANCING: "ET"}
NCR_L, ED_L, ET_L = 1, 2, 4

rows: list[tuple[str, str, str, str, str, str]] = []  # group, kind, check, measured, expected, status


def add(group, kind, check, measured, expected, ok=None):
    status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    rows.append((group, kind, check, measured, expected, status))


def fmt(x, nd=3):
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def ball(r):
    g = np.arange(-r, r + 1)
    return (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) <= r * r


def bbox(mask, pad):
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def ring(mask, st=None):
    """Voxels 6-adjacent to ``mask`` (1-voxel outer shell)."""
    return ndimage.binary_dilation(mask, st if st is not None else ndimage.generate_binary_structure(3, 1)) & ~mask


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree_hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha256(p) for p in sorted(d.rglob("*")) if p.is_file()}


def world(idx, affine):
    return idx @ affine[:3, :3].T + affine[:3, 3]


# --- per-case measurements ---------------------------------------------------------------------

def analyse(seed: int, shape=DEFAULT_SHAPE, spacing=(1.0, 1.0, 1.0), full=True, keep=False) -> dict:
    t0 = time.time()
    c = make_brain_phantom(seed, shape=shape, spacing=spacing)
    gen_s = time.time() - t0
    img, lab, tis, aff = c.image, c.label, c.tissue, c.affine
    vox_ml = float(np.prod(np.abs(np.diag(aff)[:3]))) / 1000.0
    m: dict = {"seed": seed, "gen_s": gen_s, "shape": img.shape[1:], "affine": aff, "vox_ml": vox_ml}
    brain = tis != BACKGROUND
    wt, ncr, et, ed = lab > 0, lab == NCR_L, lab == ET_L, lab == ED_L
    tc = ncr | et
    m["dtype"] = (str(img.dtype), str(lab.dtype), str(tis.dtype))
    m["label_values"] = sorted(int(v) for v in np.unique(lab))
    exp_lab = np.zeros(8, np.uint8)
    exp_lab[[OEDEMA, NECROSIS, ENHANCING]] = [ED_L, NCR_L, ET_L]
    m["label_matches_tissue"] = bool(np.array_equal(lab, exp_lab[tis]))
    m["vol"] = {k: float(v.sum()) * vox_ml for k, v in
                {"brain": brain, "WT": wt, "TC": tc, "ET": et, "NCR": ncr, "ED": ed}.items()}
    m["tissue_ml"] = {TNAME[t]: float((tis == t).sum()) * vox_ml for t in TNAME}
    m["finite"] = bool(np.isfinite(img).all())
    m["min"] = float(img.min())
    m["zero_outside"] = [int(np.count_nonzero(img[s][~brain])) for s in range(4)]
    m["min_inside"] = [float(img[s][brain].min()) for s in range(4)]
    m["nonzero_inside_frac"] = [float(np.count_nonzero(img[s][brain]) / brain.sum()) for s in range(4)]
    m["label_outside_brain"] = int((wt & ~brain).sum())
    # brain fits inside the field of view with a margin, is one piece
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    m["margin_vox"] = int(min(lo.min(), (np.array(brain.shape) - 1 - hi).min()))
    m["extent_mm"] = ((hi - lo + 1) * np.abs(np.diag(aff)[:3])).tolist()
    lb, n = ndimage.label(brain)
    m["brain_components"] = int(n)
    bc = world(idx.mean(0), aff)
    m["brain_centroid_mm"] = bc.tolist()
    if not full:
        m["tc_centroid_mm"] = world(np.argwhere(tc).mean(0), aff).tolist()
        return m

    # ---- tumour geometry (work in the tumour's bounding box) ----
    sl = bbox(wt, 6)
    wt_b, tc_b, ncr_b, et_b, ed_b, tis_b = wt[sl], tc[sl], ncr[sl], et[sl], ed[sl], tis[sl]
    r_ncr = ring(ncr_b)
    m["ncr_ring_et"] = float(et_b[r_ncr].mean())  # share of NCR's 6-neighbour shell that is ET
    m["ncr_ring_ed_or_normal"] = float((~tc_b[r_ncr]).mean())
    d2 = ndimage.binary_dilation(ncr_b, ball(2))  # 2 mm (spacing 1 mm)
    m["ncr_dil2_in_tc"] = float(tc_b[d2].mean())
    m["ncr_in_filled_et"] = float(ndimage.binary_fill_holes(et_b)[ncr_b].mean())
    m["tc_in_filled_wt"] = float(ndimage.binary_fill_holes(wt_b)[tc_b].mean())
    r_tc = ring(tc_b)
    m["tc_ring_ed"] = float(ed_b[r_tc].mean())
    m["tc_ring_normal"] = {TNAME[t]: float((tis_b[r_tc] == t).mean()) for t in (CSF, GM, WM, DEEP_GM)}
    paren = (tis_b == GM) | (tis_b == WM) | (tis_b == DEEP_GM)
    m["ncr_ring_parenchyma"] = float(paren[r_ncr].mean())  # NCR touching normal GM/WM directly
    m["tc_ring_parenchyma"] = float(paren[r_tc].mean())
    m["tc_in_filled_ed"] = float(ndimage.binary_fill_holes(ed_b)[tc_b].mean())
    r_wt = ring(wt_b)
    m["wt_ring"] = {TNAME[t]: float((tis_b[r_wt] == t).mean()) for t in (CSF, GM, WM, DEEP_GM)}
    m["wt_ring_background"] = float((tis_b[r_wt] == BACKGROUND).mean())
    for name, msk in (("WT", wt_b), ("TC", tc_b), ("ET", et_b)):
        l, n = ndimage.label(msk)
        sizes = np.bincount(l.ravel())[1:]
        m[f"{name}_components"] = int(n)
        m[f"{name}_largest_frac"] = float(sizes.max() / sizes.sum())
    # ET rim thickness: twice the 90th percentile of the distance from ET voxels to non-ET (mm)
    edt = ndimage.distance_transform_edt(et_b, sampling=np.abs(np.diag(aff)[:3]))
    m["et_thickness_mm"] = float(2 * np.percentile(edt[et_b], 90))
    # centroid, side, shape
    off = np.array([s.start for s in sl])
    tidx = np.argwhere(tc_b) + off
    widx = np.argwhere(wt_b) + off
    tcen = world(tidx.mean(0), aff)
    m["tc_centroid_mm"] = tcen.tolist()
    side = np.sign(tcen[0] - bc[0])
    m["tc_same_side"] = float((np.sign(world(tidx, aff)[:, 0] - bc[0]) == side).mean())
    m["wt_same_side"] = float((np.sign(world(widx, aff)[:, 0] - bc[0]) == side).mean())
    m["tc_dist_midline_mm"] = float(abs(tcen[0] - bc[0]))
    cov = np.cov(world(widx, aff).T)
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    m["wt_elongation"] = float(np.sqrt(ev[0] / ev[2]))
    surf = widx[ring(~wt_b)[tuple((widx - off).T)]]  # WT voxels with a non-WT 6-neighbour
    # solidity = voxel count / hull of the surface voxel centres, normalised by the same for a digital
    # ball of equal volume (so a perfectly convex blob scores ~1 whatever its size)
    raw = wt_b.sum() / ConvexHull(surf + 0.0).volume
    r = (3 * wt_b.sum() / (4 * np.pi)) ** (1 / 3)
    bl_ = ball(int(np.ceil(r)) + 1)
    g_ = np.arange(bl_.shape[0]) - bl_.shape[0] // 2
    bl_ = (g_[:, None, None] ** 2 + g_[None, :, None] ** 2 + g_[None, None, :] ** 2) <= r * r
    bidx = np.argwhere(bl_ & ~ndimage.binary_erosion(bl_, ndimage.generate_binary_structure(3, 1)))
    m["wt_solidity"] = float(raw / (bl_.sum() / ConvexHull(bidx + 0.0).volume))
    m["wt_mask"] = (sl, wt_b.copy(), tc_b.copy())
    # oedema signal profile: FLAIR of ED within 3 mm of the core vs ED on the outer WT border
    near_tc = ndimage.binary_dilation(tc_b, ball(3)) & ed_b
    outer = ed_b & ring(~wt_b)
    fl = img[3][sl]
    m["ed_outer_over_inner_flair"] = float(np.median(fl[outer]) / np.median(fl[near_tc]))

    # ---- contrasts: median intensity per tissue per sequence ----
    med = {}
    for t in TNAME:
        sel = tis == t
        med[TNAME[t]] = [float(np.median(img[s][sel])) for s in range(4)]
    m["median"] = med
    # enhancement: T1ce/T1 of each tissue relative to that of WM
    m["enh"] = {k: (v[1] / v[0]) / (med["WM"][1] / med["WM"][0]) for k, v in med.items()}

    # ---- bias field and noise in white matter ----
    wm = tis == WM
    wm_e1 = ndimage.binary_erosion(wm, iterations=1)
    wm_e = ndimage.binary_erosion(wm_e1, iterations=1)  # 3x3x3 windows centred here lie in WM
    cen = np.round(idx.mean(0)).astype(int)
    octant = ((np.arange(brain.shape[0]) >= cen[0])[:, None, None] * 1 + (np.arange(brain.shape[1]) >= cen[1])[None, :, None] * 2
              + (np.arange(brain.shape[2]) >= cen[2])[None, None, :] * 4)
    B = 16  # block size in voxels (16 mm at 1 mm)
    bs = tuple(s // B for s in brain.shape)
    crop = tuple(slice(0, n * B) for n in bs)
    wmc = wm_e1[crop].reshape(bs[0], B, bs[1], B, bs[2], B)
    wm_count = wmc.sum((1, 3, 5))
    good = wm_count >= 800
    m["bias"], m["noise"] = [], []
    for s in range(4):
        x = img[s]
        wm_med = float(np.median(x[wm_e1]))
        octs = np.array([np.median(x[wm_e1 & (octant == o)]) for o in range(8)])
        oct_spread = float((octs.max() - octs.min()) / wm_med)
        xc = x[crop].reshape(bs[0], B, bs[1], B, bs[2], B).transpose(0, 2, 4, 1, 3, 5).reshape(*bs, -1)
        mc = wmc.transpose(0, 2, 4, 1, 3, 5).reshape(*bs, -1)
        blk = np.full(bs, np.nan)
        for ijk in zip(*np.nonzero(good)):
            blk[ijk] = np.median(xc[ijk][mc[ijk]])
        blk /= wm_med
        vals = blk[good]
        spread = float(np.percentile(vals, 95) - np.percentile(vals, 5))
        diffs = []
        for ax in range(3):
            a = np.moveaxis(blk, ax, 0)
            d = np.abs(a[1:] - a[:-1])
            diffs.append(d[np.isfinite(d)])
        diffs = np.concatenate(diffs)
        adj95 = float(np.percentile(diffs, 95))
        # quadratic trend of the block medians: share of their variance a 2nd-order polynomial explains
        bi = np.argwhere(good).astype(float)
        bi = (bi - bi.mean(0)) / bi.std(0)
        X = np.column_stack([np.ones(len(bi))] + [bi[:, a] for a in range(3)]
                            + [bi[:, a] * bi[:, b] for a in range(3) for b in range(a, 3)])
        coef, *_ = np.linalg.lstsq(X, vals, rcond=None)
        r2 = float(1 - np.var(vals - X @ coef) / np.var(vals))
        # noise: median local coefficient of variation in 3x3x3 windows within WM; neighbour-difference
        # sigma per axis (lag-1 autocorrelation rho from var(d) = 2 sigma^2 (1 - rho))
        mu = ndimage.uniform_filter(x, 3)
        mu2 = ndimage.uniform_filter(x * x, 3)
        lsd = np.sqrt(np.maximum(mu2 - mu * mu, 0) * 27 / 26)
        cv = float(np.median(lsd[wm_e] / mu[wm_e]))
        sig_local = float(np.median(lsd[wm_e]))
        rho = []
        for ax in range(3):
            a = np.moveaxis(x, ax, 0)
            w = np.moveaxis(wm_e1, ax, 0)
            both = w[1:] & w[:-1]
            d = (a[1:] - a[:-1])[both]
            sd = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)
            rho.append(float(1 - (sd / sig_local) ** 2))
        m["bias"].append({"oct_spread": oct_spread, "blk_spread": spread, "adj95": adj95,
                          "adj_over_spread": adj95 / spread if spread > 0 else float("inf"),
                          "quad_r2": r2, "n_blocks": int(good.sum()), "blk": blk,
                          "oct_se": float(1.2533 * sig_local / np.sqrt((wm_e1 & (octant == 0)).sum()) / wm_med)})
        m["noise"].append({"cv": cv, "snr": wm_med / sig_local, "rho": rho, "sigma": sig_local})
    # correlation of the bias pattern between sequences (block medians)
    bl = np.array([b["blk"][good] for b in m["bias"]])
    m["bias_corr"] = np.corrcoef(bl)
    # partial volume: WM voxels touching GM vs WM voxels >=3 voxels from any non-WM (T1)
    wm_edge = wm & ndimage.binary_dilation(tis == GM, ndimage.generate_binary_structure(3, 1))
    wm_deep = ndimage.binary_erosion(wm, iterations=3)
    m["pv_ratio_T1"] = float(np.median(img[0][wm_edge]) / np.median(img[0][wm_deep]))
    # ventricles: CSF more than 20 mm from the outside of the brain mask
    dist = ndimage.distance_transform_edt(brain, sampling=np.abs(np.diag(aff)[:3]))
    deep_csf = (tis == CSF) & (dist > 20)
    didx = np.argwhere(deep_csf)
    if len(didx):
        xw = world(didx, aff)[:, 0] - bc[0]
        m["vent_ml"] = float(len(didx)) * vox_ml
        m["vent_left_ml"], m["vent_right_ml"] = float((xw < 0).sum()) * vox_ml, float((xw > 0).sum()) * vox_ml
        m["vent_mean_abs_x"] = float(np.abs(xw).mean())
    else:
        m["vent_ml"] = m["vent_left_ml"] = m["vent_right_ml"] = 0.0
        m["vent_mean_abs_x"] = float("nan")
    # FLAIR CSF skewness (Rician noise on a suppressed signal is right-skewed)
    v = img[3][tis == CSF]
    # hemispheres joined across the midline: share of the mid-sagittal brain plane with no CSF within 3 mm
    mid = int(round(idx.mean(0)[0]))
    slab = tis[mid - 3:mid + 4]
    plane = tis[mid] != BACKGROUND
    m["midline_joined"] = float((plane & ~(slab == CSF).any(0)).sum() / plane.sum())
    m["flair_csf_skew"] = float(((v - v.mean()) ** 3).mean() / v.std() ** 3)
    m["arrays"] = (img, lab) if keep else None
    m["total_s"] = time.time() - t0
    return m


# --- checks ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/brain-phantom-check.md")
    args = ap.parse_args()
    T0 = time.time()
    seeds = args.seeds

    # ---------------- determinism (arrays) ----------------
    a, b = make_brain_phantom(seeds[0]), make_brain_phantom(seeds[0])
    same = all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("image", "label", "tissue", "affine"))
    same_bytes = all(getattr(a, k).tobytes() == getattr(b, k).tobytes() for k in ("image", "label", "tissue"))
    add("determinism", "SPEC", f"same seed ({seeds[0]}) twice -> identical image/label/tissue/affine arrays",
        f"array_equal={same}, tobytes equal={same_bytes}", "identical", same and same_bytes)
    del a, b

    cases = []
    for s in seeds:
        cases.append(analyse(s, keep=s == seeds[0]))
        print(f"seed {s}: {cases[-1]['total_s']:.1f} s", flush=True)

    # different seeds -> different tumours
    dices, tdices, dists = [], [], []
    for ca, cb in itertools.combinations(cases, 2):
        (sa, ma, ta), (sb, mb, tb) = ca["wt_mask"], cb["wt_mask"]
        A = np.zeros(ca["shape"], bool); A[sa] = ma
        Bm = np.zeros(cb["shape"], bool); Bm[sb] = mb
        dices.append(2 * (A & Bm).sum() / (A.sum() + Bm.sum()))
        A[:] = False; A[sa] = ta
        Bm[:] = False; Bm[sb] = tb
        tdices.append(2 * (A & Bm).sum() / (A.sum() + Bm.sum()))
        dists.append(float(np.linalg.norm(np.subtract(ca["tc_centroid_mm"], cb["tc_centroid_mm"]))))
    add("determinism", "SPEC", f"different seeds -> different tumours: max pairwise WT Dice over {len(dices)} pairs",
        f"{max(dices):.3f} (mean {np.mean(dices):.3f})", "< 0.5", max(dices) < 0.5)
    add("determinism", "SPEC", f"different seeds -> different tumours: max pairwise TC (NCR∪ET) Dice over {len(tdices)} pairs",
        f"{max(tdices):.3f} (mean {np.mean(tdices):.3f})", "< 0.5", max(tdices) < 0.5)
    imgs_differ = not np.array_equal(cases[0]["arrays"][0], make_brain_phantom(seeds[1]).image)
    add("determinism", "SPEC", f"different seeds ({seeds[0]} vs {seeds[1]}) -> different image arrays",
        str(imgs_differ), "True", imgs_differ)

    # ---------------- dataset writing: twice via API, once via CLI ----------------
    ds_seed, nl, nu = 11, 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_brain_phantom_dataset(tmp / "a", nl, nu, seed=ds_seed)
        write_brain_phantom_dataset(tmp / "b", nl, nu, seed=ds_seed)
        cli = subprocess.run([sys.executable, "-m", "medmim", "data", "phantom", "--kind", "brain", "--labeled",
                              str(nl), "--unlabeled", str(nu), "--seed", str(ds_seed), str(tmp / "c")],
                             capture_output=True, text=True, cwd=ROOT)
        ha, hb = tree_hashes(tmp / "a"), tree_hashes(tmp / "b")
        hc = tree_hashes(tmp / "c") if cli.returncode == 0 else {}
        add("determinism", "SPEC", f"write_brain_phantom_dataset twice (seed {ds_seed}, {nl}+{nu} cases): sha256 of every file",
            f"{len(ha)} files, {sum(ha[k] == hb.get(k) for k in ha)}/{len(ha)} identical, same file list={set(ha) == set(hb)}",
            "all byte-identical", ha == hb and len(ha) == nl * 2 + nu + 1)
        add("determinism", "SPEC", "CLI `medmim data phantom --kind brain` (separate process) vs API write, sha256",
            f"rc={cli.returncode}, {sum(ha[k] == hc.get(k) for k in ha)}/{len(ha)} identical",
            "all byte-identical", cli.returncode == 0 and ha == hc)
        dj = json.loads((tmp / "a" / "dataset.json").read_text())
        labs_ok = set(dj.get("labels", {})) == {"0", "1", "2", "4"}
        mods_ok = [dj.get("modality", {}).get(str(i)) for i in range(4)] == list(SEQ)
        add("files", "SPEC", "dataset.json labels / modality", f"labels={dj.get('labels')}, modality={dj.get('modality')}",
            "labels {0,1,2,4}; modality T1,T1ce,T2,FLAIR", labs_ok and mods_ok)
        ni = nib.load(tmp / "a" / "imagesTr" / "brain_0000.nii.gz")
        nl_ = nib.load(tmp / "a" / "labelsTr" / "brain_0000.nii.gz")
        ref = make_brain_phantom(case_seed(ds_seed, 0))
        fimg, flab = np.asarray(ni.dataobj), np.asarray(nl_.dataobj)
        eq_img = fimg.shape == ref.image.shape[1:] + (4,) and np.array_equal(np.moveaxis(fimg, -1, 0), ref.image)
        eq_lab = np.array_equal(flab, ref.label)
        add("files", "DOC", "written case 0 == make_brain_phantom(case_seed(seed, 0)) (image [I,J,K,4], label)",
            f"image shape {fimg.shape} {fimg.dtype}, equal={eq_img}; label {flab.dtype} equal={eq_lab}",
            "equal", bool(eq_img and eq_lab))
        zooms = tuple(float(z) for z in ni.header.get_zooms()[:3])
        lz = tuple(float(z) for z in nl_.header.get_zooms()[:3])
        aff_ok = np.allclose(ni.affine, ref.affine) and np.allclose(nl_.affine, ref.affine)
        add("grid", "SPEC", "NIfTI voxel size (image, label) and affine of the written files",
            f"image zooms {zooms}, label zooms {lz}, affine diag {np.diag(ni.affine)[:3].tolist()}, matches case affine={aff_ok}",
            "1.0 mm isotropic", zooms == (1.0, 1.0, 1.0) and lz == (1.0, 1.0, 1.0) and aff_ok)
        fvals = sorted(int(v) for v in np.unique(flab))
        add("files", "SPEC", "label values in the written label file", str(fvals), "subset of {0,1,2,4}",
            set(fvals) <= {0, 1, 2, 4})
        del fimg, flab, ref, ni, nl_

    # ---------------- labels ----------------
    allv = sorted(set().union(*[c["label_values"] for c in cases]))
    add("labels", "SPEC", f"label values, union over seeds {seeds}", str(allv), "subset of {0,1,2,4}", set(allv) <= {0, 1, 2, 4})
    per = [c["label_values"] for c in cases]
    add("labels", "SPEC", "every case has all of 1, 2, 4 (NCR, ED, ET non-empty)", str(per),
        "each contains 1, 2, 4", all({1, 2, 4} <= set(p) for p in per))
    add("labels", "DOC", "label == BraTS value of the tissue class (ED->2, NCR->1, ET->4, else 0)",
        str([c["label_matches_tissue"] for c in cases]), "all True", all(c["label_matches_tissue"] for c in cases))
    add("labels", "SPEC", "dtypes image / label / tissue", str(cases[0]["dtype"]), "float32 / uint8 / uint8",
        cases[0]["dtype"] == ("float32", "uint8", "uint8"))
    add("labels", "SPEC", "tumour voxels outside the brain mask", str([c["label_outside_brain"] for c in cases]), "0",
        all(c["label_outside_brain"] == 0 for c in cases))

    def per_seed(key, fn=lambda v: v, nd=3):
        vals = [fn(c[key]) for c in cases]
        return vals, ", ".join(f"{v:.{nd}g}" for v in vals)

    v, txt = per_seed("ncr_ring_et")
    add("nesting", "SPEC", "NCR enclosed by ET: share of NCR's 6-neighbour shell labelled ET (per seed)", txt, ">= 0.9", min(v) >= 0.9)
    v, txt = per_seed("ncr_dil2_in_tc")
    add("nesting", "SPEC", "NCR dilated by a 2 mm ball lies within ET∪NCR: share (per seed)", txt, ">= 0.95", min(v) >= 0.95)
    v, txt = per_seed("ncr_in_filled_et")
    add("nesting", "INFO", "share of NCR inside fill_holes(ET) (ET shell closed, 6-conn.)", txt, "1 if the rim is watertight")
    v, txt = per_seed("tc_in_filled_wt")
    add("nesting", "SPEC", "TC inside fill_holes(WT) (weak: TC ⊂ WT by construction of the labels)", txt, "= 1", min(v) == 1.0)
    v, txt = per_seed("tc_ring_ed")
    add("nesting", "SPEC", "oedema surrounds the core: share of TC's 6-neighbour shell labelled ED (per seed)", txt, ">= 0.8", min(v) >= 0.8)
    v, txt = per_seed("ncr_ring_parenchyma")
    add("nesting", "REAL", "necrosis touching normal parenchyma: share of NCR's shell that is normal GM/WM/deep GM", txt,
        "<= 0.05 (necrosis lies inside tumour)", max(v) <= 0.05)
    v, txt = per_seed("tc_ring_parenchyma")
    add("nesting", "INFO", "core touching normal parenchyma: share of TC's shell that is normal GM/WM/deep GM", txt, "-")
    v, txt = per_seed("tc_in_filled_ed")
    add("nesting", "INFO", "share of TC inside fill_holes(ED) (oedema shell closed)", txt, "1 if oedema fully encloses the core")
    add("nesting", "INFO", "tissue of TC's shell that is not tumour (seed 0)",
        ", ".join(f"{k} {v_:.3f}" for k, v_ in cases[0]["tc_ring_normal"].items()), "-")
    add("nesting", "INFO", "tissue just outside WT (6-neighbour shell), seed 0 / mean over seeds",
        ", ".join(f"{k} {cases[0]['wt_ring'][k]:.2f}/{np.mean([c['wt_ring'][k] for c in cases]):.2f}" for k in cases[0]["wt_ring"])
        + f", outside-brain {np.mean([c['wt_ring_background'] for c in cases]):.3f}",
        "real vasogenic oedema: WM-bound, stops at cortex")
    v, txt = per_seed("WT_largest_frac")
    add("nesting", "REAL", "WT is one lesion: largest connected component / WT volume", txt, ">= 0.95", min(v) >= 0.95)
    add("nesting", "INFO", "connected components WT / TC / ET per seed",
        "; ".join(f"{c['WT_components']}/{c['TC_components']}/{c['ET_components']}" for c in cases), "-")
    v, txt = per_seed("et_thickness_mm", nd=2)
    add("nesting", "REAL", "enhancing rim thickness ≈ 2×p90(distance inside ET) (mm)", txt, "2–10 mm (real rims: a few mm)",
        min(v) >= 2 and max(v) <= 10)

    # ---------------- volumes ----------------
    vol = {k: [c["vol"][k] for c in cases] for k in ("WT", "TC", "ET", "NCR", "ED", "brain")}
    f = lambda k: ", ".join(f"{x:.1f}" for x in vol[k])
    add("volumes", "SPEC", "WT volume (mL) per seed", f("WT"), "10–300 mL", all(10 <= x <= 300 for x in vol["WT"]))
    add("volumes", "SPEC", "ET and NCR volumes (mL) per seed", f"ET {f('ET')}; NCR {f('NCR')}", "> 0",
        all(x > 0 for x in vol["ET"] + vol["NCR"]))
    add("volumes", "INFO", "TC / ED volumes (mL) per seed", f"TC {f('TC')}; ED {f('ED')}", "BraTS21 medians ≈ WT 90, TC 35, ET 20 mL")
    cvw = float(np.std(vol["WT"]) / np.mean(vol["WT"]))
    add("volumes", "SPEC", "WT volume varies across seeds: coefficient of variation", f"{cvw:.3f} (range {min(vol['WT']):.1f}–{max(vol['WT']):.1f})", ">= 0.1", cvw >= 0.1)
    cvt = float(np.std(vol["TC"]) / np.mean(vol["TC"]))
    add("volumes", "SPEC", "TC volume varies across seeds: coefficient of variation", f"{cvt:.3f}", ">= 0.1", cvt >= 0.1)
    r1 = [t / w for t, w in zip(vol["TC"], vol["WT"])]
    r2 = [e / t for e, t in zip(vol["ET"], vol["TC"])]
    add("volumes", "REAL", "TC/WT per seed", ", ".join(f"{x:.2f}" for x in r1), "0.1–0.9", all(0.1 <= x <= 0.9 for x in r1))
    add("volumes", "REAL", "ET/TC per seed", ", ".join(f"{x:.2f}" for x in r2), "0.15–0.95", all(0.15 <= x <= 0.95 for x in r2))
    add("volumes", "REAL", "brain-mask volume (mL) per seed", f("brain"), "1000–1800 mL (adult brain + CSF in a BraTS mask)",
        all(1000 <= x <= 1800 for x in vol["brain"]))
    tfr = {k: [c["tissue_ml"][k] / c["vol"]["brain"] for c in cases] for k in cases[0]["tissue_ml"]}
    add("volumes", "INFO", "tissue share of the brain mask (mean over seeds)",
        ", ".join(f"{k} {np.mean(v_):.3f}" for k, v_ in tfr.items()), "adult: GM ~0.45, WM ~0.35–0.40, CSF ~0.1–0.2")
    gmf = [g + d for g, d in zip(tfr["GM"], tfr["deepGM"])]
    add("volumes", "REAL", "GM (cortical + deep) share of the brain mask", ", ".join(f"{x:.2f}" for x in gmf), "0.30–0.60",
        all(0.3 <= x <= 0.6 for x in gmf))
    add("volumes", "REAL", "WM share of the brain mask (normal WM, excluding tumour)", ", ".join(f"{x:.2f}" for x in tfr["WM"]),
        "0.25–0.50", all(0.25 <= x <= 0.5 for x in tfr["WM"]))
    add("volumes", "REAL", "CSF share of the brain mask", ", ".join(f"{x:.2f}" for x in tfr["CSF"]), "0.05–0.30",
        all(0.05 <= x <= 0.3 for x in tfr["CSF"]))
    add("volumes", "REAL", "ventricular CSF (CSF > 20 mm inside the mask), mL",
        ", ".join(f"{c['vent_ml']:.1f}" for c in cases), "3–80 mL", all(3 <= c["vent_ml"] <= 80 for c in cases))
    add("volumes", "REAL", "ventricles bilateral: deep CSF left / right of midline (mL), mean |x| (mm)",
        "; ".join(f"{c['vent_left_ml']:.1f}/{c['vent_right_ml']:.1f}, {c['vent_mean_abs_x']:.0f}" for c in cases),
        ">= 1 mL each side, mean |x| < 25 mm",
        all(min(c["vent_left_ml"], c["vent_right_ml"]) >= 1 and c["vent_mean_abs_x"] < 25 for c in cases))

    # ---------------- skull strip, grid ----------------
    add("skull-strip", "SPEC", "non-zero voxels outside the brain mask, per sequence, summed over seeds",
        str(np.sum([c["zero_outside"] for c in cases], 0).tolist()), "0 in every sequence",
        all(sum(c["zero_outside"]) == 0 for c in cases))
    mi = np.min([c["min_inside"] for c in cases], 0)
    fr = np.min([c["nonzero_inside_frac"] for c in cases], 0)
    add("skull-strip", "SPEC", "inside the brain: min intensity, share of non-zero voxels (per sequence, worst seed)",
        f"min {[f'{x:.3g}' for x in mi]}, share {fr.tolist()}", "> 0, share = 1", bool((mi > 0).all() and (fr == 1).all()))
    add("skull-strip", "SPEC", "finite values, no negatives", f"finite={all(c['finite'] for c in cases)}, min={min(c['min'] for c in cases)}",
        "finite, >= 0", all(c["finite"] for c in cases) and min(c["min"] for c in cases) >= 0)
    add("skull-strip", "REAL", "brain mask one connected piece, >= 1 voxel from every face of the volume",
        f"components {[c['brain_components'] for c in cases]}, margin {[c['margin_vox'] for c in cases]} voxels",
        "1 piece, margin >= 1", all(c["brain_components"] == 1 and c["margin_vox"] >= 1 for c in cases))
    add("skull-strip", "INFO", "brain extent L-R / A-P / S-I (mm) per seed",
        "; ".join("/".join(f"{x:.0f}" for x in c["extent_mm"]) for c in cases),
        "adult: ~130–150 / ~160–180 / cerebrum ~95–110, with cerebellum + brainstem (in BraTS masks) ~130+ mm")
    v, txt = per_seed("midline_joined")
    add("skull-strip", "REAL", "hemispheres joined: share of the mid-sagittal brain plane without CSF within ±3 mm", txt,
        "<= 0.5 (real: only corpus callosum, diencephalon, brainstem cross)", max(v) <= 0.5)
    aff = cases[0]["affine"]
    sp = np.abs(np.diag(aff)[:3]).tolist()
    add("grid", "SPEC", "default grid: shape and voxel spacing from the affine",
        f"shape {cases[0]['shape']}, spacing {sp} mm, off-diagonal max {np.abs(aff[:3, :3] - np.diag(np.diag(aff)[:3])).max()}",
        "1 mm isotropic", sp == [1.0, 1.0, 1.0])
    add("grid", "DOC", "affine puts the volume centre at world (0,0,0); brain centroid (mm) per seed",
        f"centre {world((np.array(cases[0]['shape']) - 1) / 2.0, aff).round(3).tolist()}; brain centroids "
        + "; ".join("(" + ",".join(f"{x:.1f}" for x in c["brain_centroid_mm"]) + ")" for c in cases),
        "centre (0,0,0); head within ~2 mm", bool(np.allclose(world((np.array(cases[0]['shape']) - 1) / 2.0, aff), 0)))
    # BraTS's own grid and a 2 mm grid: same anatomy in mL
    g = analyse(seeds[0], shape=(240, 240, 155), full=False)
    ref0 = cases[0]["vol"]
    dv = {k: g["vol"][k] / ref0[k] - 1 for k in ("brain", "WT", "TC", "ET")}
    add("grid", "SPEC", "size is an option: BraTS grid 240×240×155 @1 mm, seed 0 volumes vs default grid (rel. diff.)",
        f"shape {g['shape']}, " + ", ".join(f"{k} {v_:+.4f}" for k, v_ in dv.items()),
        "generates; |rel diff| <= 0.02", all(abs(v_) <= 0.02 for v_ in dv.values()))
    try:
        make_brain_phantom(seeds[0], shape=(96, 96, 96))
        rej = "accepted"
    except MedmimError as e:
        rej = f"MedmimError: {str(e)[:90]}"
    add("grid", "DOC", "1 mm grid smaller than MIN_FOV_MM (96³) is refused", rej, "MedmimError", rej.startswith("MedmimError"))
    rel2 = []
    for s in seeds[:3]:
        c2 = analyse(s, shape=(80, 96, 80), spacing=(2.0, 2.0, 2.0), full=False)
        c1 = next(c for c in cases if c["seed"] == s)
        rel2.append({k: c2["vol"][k] / c1["vol"][k] - 1 for k in ("brain", "WT", "TC")})
    add("grid", "DOC", "volumes in mL do not depend on spacing: 2 mm (80×96×80) vs 1 mm, rel. diff. (3 seeds)",
        "; ".join(", ".join(f"{k} {v_:+.3f}" for k, v_ in r.items()) for r in rel2), "|brain| <= 0.03, |WT|,|TC| <= 0.10",
        all(abs(r["brain"]) <= 0.03 and abs(r["WT"]) <= 0.1 and abs(r["TC"]) <= 0.1 for r in rel2))

    # ---------------- contrasts ----------------
    def rel(seq, a_, b_):
        s = SEQ.index(seq)
        return [c["median"][a_][s] / c["median"][b_][s] for c in cases]

    def contrast(kind, seq, a_, b_, what=None):
        r = rel(seq, a_, b_)
        add("contrast", kind, f"{seq}: {a_} > {b_}" + (f" ({what})" if what else ""),
            f"median ratio {a_}/{b_} min {min(r):.3f}, max {max(r):.3f}", "> 1 every seed", min(r) > 1)

    for seq, a_, b_, w in [("T1", "WM", "GM", None), ("T1", "GM", "CSF", None),
                           ("T2", "CSF", "GM", None), ("T2", "GM", "WM", None),
                           ("FLAIR", "WM", "CSF", "CSF suppressed"), ("FLAIR", "GM", "CSF", "CSF suppressed"),
                           ("FLAIR", "ED", "WM", "oedema hyperintense"),
                           ("T1ce", "ET", "NCR", "enhancing rim"), ("T1ce", "ET", "WM", "enhancing rim"),
                           ("T1ce", "WM", "NCR", "necrosis dark"), ("T2", "ED", "WM", "oedema bright")]:
        contrast("SPEC", seq, a_, b_, w)
    for seq, a_, b_, w in [("FLAIR", "ED", "GM", "oedema brighter than cortex"), ("FLAIR", "GM", "WM", None),
                           ("T1", "WM", "ED", "oedema T1-hypointense"), ("T1", "GM", "NCR", "necrosis T1-dark"),
                           ("T1ce", "GM", "NCR", "necrosis dark"), ("T2", "NCR", "WM", "necrosis fluid-bright"),
                           ("T2", "CSF", "ED", None), ("T1", "WM", "deepGM", None), ("T1", "deepGM", "GM", None)]:
        contrast("REAL", seq, a_, b_, w)
    r = rel("FLAIR", "CSF", "WM")
    add("contrast", "REAL", "FLAIR: CSF well suppressed, CSF/WM", f"{min(r):.3f}–{max(r):.3f}", "< 0.5", max(r) < 0.5)
    r = rel("T1ce", "ET", "WM")
    add("contrast", "REAL", "T1ce: ET/WM (gadolinium enhancement)", f"{min(r):.3f}–{max(r):.3f}", ">= 1.3", min(r) >= 1.3)
    r = rel("T2", "CSF", "WM")
    add("contrast", "REAL", "T2: CSF/WM", f"{min(r):.3f}–{max(r):.3f}", ">= 2", min(r) >= 2)
    brightest = [max(c["median"], key=lambda k: c["median"][k][1]) for c in cases]
    add("contrast", "REAL", "T1ce: brightest tissue (median)", str(brightest), "ET every seed", all(b_ == "ET" for b_ in brightest))
    enh = [max(abs(c["enh"][k] - 1) for k in c["enh"] if k != "ET") for c in cases]
    add("contrast", "REAL", "only ET enhances: max |(T1ce/T1)/(T1ce/T1 of WM) - 1| over non-ET tissues",
        ", ".join(f"{x:.3f}" for x in enh), "<= 0.15", max(enh) <= 0.15)
    add("contrast", "INFO", "ET enhancement (T1ce/T1 relative to WM) per seed", ", ".join(f"{c['enh']['ET']:.2f}" for c in cases), "-")
    mt = cases[0]["median"]
    add("contrast", "INFO", f"seed {seeds[0]} medians / WM median, T1|T1ce|T2|FLAIR",
        "; ".join(f"{k} " + "|".join(f"{mt[k][s] / mt['WM'][s]:.2f}" for s in range(4)) for k in mt), "-")
    v, txt = per_seed("ed_outer_over_inner_flair")
    add("contrast", "INFO", "FLAIR oedema profile: median ED on the outer WT border / ED within 3 mm of the core", txt,
        "real: < 1 (signal fades outward); 1.00 = flat plateau")
    pv = [c["pv_ratio_T1"] for c in cases]
    add("contrast", "INFO", "partial volume: T1 median of WM voxels touching GM / deep WM", ", ".join(f"{x:.3f}" for x in pv),
        "real MRI < 1 (blurred edges); 1.00 = piecewise-constant edges")

    # ---------------- bias field, noise ----------------
    for s, name in enumerate(SEQ):
        osp = [c["bias"][s]["oct_spread"] for c in cases]
        ose = [c["bias"][s]["oct_se"] for c in cases]
        add("bias", "SPEC", f"{name}: WM median across the 8 octants, (max-min)/median (measurable)",
            ", ".join(f"{x:.3f}" for x in osp) + f" (noise s.e. of one octant median ≤ {max(ose):.4f})",
            ">= 0.01 and >= 10× s.e.", all(x >= 0.01 and x >= 10 * e for x, e in zip(osp, ose)))
    for s, name in enumerate(SEQ):
        bsp = [c["bias"][s]["blk_spread"] for c in cases]
        ratio = [c["bias"][s]["adj_over_spread"] for c in cases]
        add("bias", "SPEC", f"{name}: smooth: p95 |Δ| between adjacent 16 mm WM blocks / p5–p95 block spread",
            ", ".join(f"{x:.2f}" for x in ratio) + " (spread " + ", ".join(f"{x:.3f}" for x in bsp) + ")",
            "< 0.5 and spread <= 0.6", all(r_ < 0.5 for r_ in ratio) and max(bsp) <= 0.6)
    add("bias", "INFO", "quadratic trend R² of 16 mm WM block medians (T1|T1ce|T2|FLAIR) per seed",
        "; ".join("|".join(f"{c['bias'][s]['quad_r2']:.2f}" for s in range(4)) for c in cases),
        f"blocks per case {cases[0]['bias'][0]['n_blocks']}")
    add("bias", "INFO", f"correlation of block-median bias pattern between sequences (seed {seeds[0]}), T1-T1ce, T1-T2, T2-FLAIR",
        f"{cases[0]['bias_corr'][0, 1]:.2f}, {cases[0]['bias_corr'][0, 2]:.2f}, {cases[0]['bias_corr'][2, 3]:.2f}",
        "real: correlated within a session (same coil)")
    for s, name in enumerate(SEQ):
        cv = [c["noise"][s]["cv"] for c in cases]
        add("noise", "SPEC", f"{name}: median local CV (3×3×3 windows inside WM)", ", ".join(f"{x:.4f}" for x in cv),
            "> 0.005 (non-zero noise)", min(cv) > 0.005)
    add("noise", "REAL", "SNR = WM median / local noise σ (T1|T1ce|T2|FLAIR) per seed",
        "; ".join("|".join(f"{c['noise'][s]['snr']:.0f}" for s in range(4)) for c in cases), "5–100 (clinical BraTS scans ~10–40)",
        all(5 <= c["noise"][s]["snr"] <= 100 for c in cases for s in range(4)))
    cnr = [(c["median"]["WM"][0] - c["median"]["GM"][0]) / c["noise"][0]["sigma"] for c in cases]
    add("noise", "INFO", "T1 WM–GM CNR = (WM−GM)/σ", ", ".join(f"{x:.1f}" for x in cnr), "real 1.5–3 T: ~2–8")
    add("noise", "INFO", "noise lag-1 autocorrelation along i|j|k (T1; FLAIR), seed 0",
        "|".join(f"{x:.2f}" for x in cases[0]["noise"][0]["rho"]) + "; " + "|".join(f"{x:.2f}" for x in cases[0]["noise"][3]["rho"]),
        "0 = white; real BraTS T2/FLAIR (thick slices resampled to 1 mm) strongly correlated along the slice axis")
    add("noise", "INFO", "FLAIR CSF intensity skewness (Rician on suppressed signal > 0)",
        ", ".join(f"{c['flair_csf_skew']:.2f}" for c in cases), "> 0 for Rician")

    # ---------------- seeded variation ----------------
    add("variation", "SPEC", "tumour (TC) centroid differs across seeds: min pairwise distance (mm)",
        f"{min(dists):.1f} (median {np.median(dists):.1f}); centroids "
        + "; ".join("(" + ",".join(f"{x:.0f}" for x in c["tc_centroid_mm"]) + ")" for c in cases), ">= 5 mm", min(dists) >= 5)
    el = [c["wt_elongation"] for c in cases]
    so = [c["wt_solidity"] for c in cases]
    add("variation", "SPEC", "tumour shape varies: WT elongation √(λ1/λ3) per seed, range",
        ", ".join(f"{x:.2f}" for x in el) + f" (range {max(el) - min(el):.2f})", "range >= 0.1", max(el) - min(el) >= 0.1)
    add("variation", "REAL", "WT irregular: solidity (volume / convex-hull volume) per seed", ", ".join(f"{x:.2f}" for x in so),
        "< 0.95 (real gliomas are not convex blobs)", max(so) < 0.95)
    add("variation", "DOC", "tumour (NCR∪ET) in one hemisphere: share of TC on the side of its centroid",
        ", ".join(f"{c['tc_same_side']:.3f}" for c in cases), ">= 0.99", all(c["tc_same_side"] >= 0.99 for c in cases))
    add("variation", "REAL", "oedema stays in the tumour's hemisphere: share of WT on the side of the TC centroid",
        ", ".join(f"{c['wt_same_side']:.3f}" for c in cases), ">= 0.95 (crossing only via corpus callosum, uncommon)",
        all(c["wt_same_side"] >= 0.95 for c in cases))
    sides = ["R" if c["tc_centroid_mm"][0] > c["brain_centroid_mm"][0] else "L" for c in cases]
    add("variation", "INFO", "hemisphere of the tumour, distance of TC centroid from midline (mm)",
        ", ".join(f"{sd} {c['tc_dist_midline_mm']:.0f}" for sd, c in zip(sides, cases)), "-")
    bv = vol["brain"]
    add("variation", "INFO", "brain volume CV across seeds", f"{np.std(bv) / np.mean(bv):.3f}", "real adults ~0.1")
    add("runtime", "INFO", "generation time per default case (s)", ", ".join(f"{c['gen_s']:.1f}" for c in cases), "-")

    # ---------------- report ----------------
    n_fail = sum(r_[5] == "FAIL" for r_ in rows)
    hard_fail = sum(r_[5] == "FAIL" and r_[1] in ("SPEC", "DOC") for r_ in rows)
    lines = [
        "# Brain phantom check (`medmim.data.phantom_brain`)", "",
        f"Generated by `benchmarks/check_brain_phantom.py`: seeds {seeds} at the default grid "
        f"{tuple(cases[0]['shape'])} @ 1 mm, seed {seeds[0]} also at 240×240×155 @ 1 mm, seeds {seeds[:3]} at 80×96×80 @ 2 mm; "
        f"dataset seed {ds_seed} ({nl} labeled + {nu} unlabeled) written twice via the API and once via the CLI. "
        f"Total {time.time() - T0:.0f} s.", "",
        "kind: SPEC = the issue's specification, DOC = the module's docstrings, REAL = realism by BraTS / "
        "adult-anatomy standards (not demanded by the issue), INFO = reported only. Tissue regions come from "
        "`BrainPhantomCase.tissue`; medians are over all voxels of a class.", "",
        f"**{sum(r_[5] == 'PASS' for r_ in rows)} PASS, {n_fail} FAIL ({hard_fail} SPEC/DOC), "
        f"{sum(r_[5] == 'INFO' for r_ in rows)} INFO.**", "",
        "| # | group | kind | check | measured | expected | result |", "|---|---|---|---|---|---|---|"]
    for i, r_ in enumerate(rows, 1):
        cells = [c.replace("|", "\\|") for c in r_]
        st = f"**{cells[5]}**" if cells[5] == "FAIL" else cells[5]
        lines.append(f"| {i} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {cells[4]} | {st} |")
    lines += ["", "Notes on the expectations:", "",
              "* REAL thresholds are approximate adult/BraTS ranges; a REAL FAIL means 'unlike real BraTS', "
              "not a violation of the issue.",
              "* BraTS 2021 label 1 is necrotic *and non-enhancing* tumour core, so in real scans label 1 often "
              "touches oedema through gaps in the enhancing rim; the NCR-enclosure thresholds follow the issue's "
              "'necrotic core with an enhancing rim', which is stricter than typical BraTS annotations.",
              "* Pairwise WT Dice < 0.5 is a heuristic for 'different tumours'; two seeds whose tumours fall in the "
              "same lobe can overlap more than that in real cohorts too (see the TC Dice and centroid rows).",
              "* T1 and T1ce are different acquisitions in real BraTS, so their ratio is not exactly constant "
              "across non-enhancing tissues; the 0.15 bound is strict.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"\nwrote {args.out}")
    return 1 if hard_fail else 0


if __name__ == "__main__":
    sys.exit(main())
