"""Triton kernels of the Triton backend. Imported lazily by triton.py: importing w4a16_ops never needs triton.

Kernels (triton.py picks one and its configuration by M from the shipped table):

* ``nibble_gemm_kernel`` (decode and medium M): out^T = W^T @ x^T ("swap AB"). The dequantized weight
  is the A operand of tl.dot, which lives in registers (on Hopper, wgmma reads A from registers), so the
  weights never take a round trip through shared memory after dequantization, and the weight dimension
  fills the tensor core's M = 64 while the few rows of x become its small N. Split-K over a third grid
  axis; fp32 partials reduced in split order by ``splitk_reduce_kernel`` or, optionally, by the last
  program of each output tile (IN_REDUCE): bit-identical, deterministic either way.
* ``dequant_kernel`` (large M, with torch.mm): the dense [K, N] weight, (q - z) * s rounded once.
* ``dense_gemm_kernel``: out = x @ W with the dequantized tile as the shared-memory B operand (kept for
  GPUs and sizes where it wins; on the H100 dequant + torch.mm is faster).

Reading the packed format (w4a16_ops/format.py) without repacking. In a 16 x 64 tile,

    word   = 16 c + 4 t4 + j           kk = k % 16 = 8 h + 2 t4 + b
    nibble = 4 b + 2 blk + h           nn = n % 64 = 16 j + 8 blk + c

nibble_gemm_kernel never expands a word with broadcasts or reshapes of the weights (those make the
compiler shuffle the weights through shared memory). It loads words as a tile [R, Q], rows r = (64-column
tile, c, j), columns q = (slab, t4), joins the tile with itself ([R, 2Q]: the k pair b = 0, 1 that a thread
holds in the dot-operand layout, so each word is loaded once, straight into registers) and computes four
dots per K tile, one per (blk, h):

    p_blk += A_blk_h @ X_h,   A_blk_h[r, 2 q + b] = nibble 4 b + 2 blk + h of word[r, q] (as q - 8),
                              X_h[(slab, t4, b), m] = x[m, 16 slab + 8 h + 2 t4 + b]

X_h is 8 contiguous k per slab, loaded (and pipelined) straight from x. Output row r of half blk is
column n = 64 tile + 16 j + 8 blk + c.

Dequantization without int->float conversion: a nibble masked in place and or-ed with the exponent of
a power of two v whose mantissa unit is the nibble's lowest bit reads as v + q, exactly; a packed subtract
of v + 8 leaves the exact q - 8 (see _deq_pair: lop3 + sub per two weights on the GPU, plus one shift per
word for half of the nibbles). Zero points: a rank-1 correction -(z - 8) * colsum(x) after the dots while
every column sum of the tile's x is finite (the weights stay in registers: triton 3.6 sends a chain with a
per-row subtract through shared memory, 1.4-2.6x slower on an H100); a tile whose x sums are Inf or NaN takes
q - z exactly in the weights instead (the correction would turn an Inf into Inf - Inf = NaN). Scales
multiply the fp32 partial sums of each group (a K tile with several groups runs its dots once per group
against x with the other groups' rows masked at the load) or the accumulator once at the end for
channelwise G = K. The interpreter (CPU tests) runs the
same math in plain Triton (USE_ASM off).
"""

from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------------------
# Dequantization helpers
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _deq_nibble(words, NIB: tl.constexpr, DTYPE: tl.constexpr):
    """q - 8 of nibble NIB of every word, exact, in DTYPE (plain Triton)."""
    if DTYPE == tl.bfloat16:
        MAGIC: tl.constexpr = 0x4300
        OFFSET: tl.constexpr = 136.0
    else:
        MAGIC: tl.constexpr = 0x6400
        OFFSET: tl.constexpr = 1032.0
    if NIB == 0:
        t = words & 15
    else:
        t = (words >> (4 * NIB)) & 15
    return (t | MAGIC).to(tl.int16).to(DTYPE, bitcast=True) - OFFSET


@triton.jit
def _magic_offset(H: tl.constexpr, DTYPE: tl.constexpr):
    """The value v such that _deq_pair returns v + q for nibbles with h = H (fp16: 1024, 64; bf16: 128, 16)."""
    if DTYPE == tl.bfloat16:
        if H == 0:
            return 128.0
        else:
            return 16.0
    else:
        if H == 0:
            return 1024.0
        else:
            return 64.0


@triton.jit
def _deq_pair(w2, NIB: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """w2 [R, 2Q] holds every word twice (columns 2 q and 2 q + 1). Returns q - 8 of nibble NIB of the first
    copy and of nibble NIB + 4 of the second one (the weights of rows k and k + 1, b = 0, 1, of the word's
    column), exact, in DTYPE.

    In each 16-bit half of a word, nibble NIB sits at bits 4 (NIB % 2) + 8 (NIB // 2) .. + 3. One lop3 masks a
    nibble in place and ors in the exponent of a power of two whose mantissa unit is the nibble's lowest bit:
    1024 for bits 0-3 and 64 for bits 4-7 in fp16 (10 mantissa bits), so nibbles 0, 1, 4, 5 need no shift and
    2, 3, 6, 7 share one shift by 8. bf16 has 7 mantissa bits: bits 0-3 use 128, and the other nibbles are
    first shifted to bits 3-6 (unit 16). That reads as v + q, exactly; one packed subtract of v + 8 leaves
    q - 8 (exact; keeping the offset out of the dot keeps IEEE semantics: Inf * 0 = NaN where q = 8). With
    USE_ASM the pair (two copies of a word, consecutive elements of a thread: the k pair of the dot-operand
    layout) becomes one f16x2 / bf16x2 register: lop3 + sub for two weights.
    """
    H: tl.constexpr = NIB % 2
    if DTYPE == tl.bfloat16:
        if H == 0:
            RSHIFT: tl.constexpr = 8 * (NIB // 2)  # nibble to bits 0-3
            MASK: tl.constexpr = 0x000F000F
            MAGIC: tl.constexpr = 0x43004300  # 128.0
        else:
            RSHIFT: tl.constexpr = 8 * (NIB // 2) + 1  # bits 4-7 to bits 3-6
            MASK: tl.constexpr = 0x00780078
            MAGIC: tl.constexpr = 0x41804180  # 16.0
    else:
        RSHIFT: tl.constexpr = 8 * (NIB // 2)
        if H == 0:
            MASK: tl.constexpr = 0x000F000F
            MAGIC: tl.constexpr = 0x64006400  # 1024.0
        else:
            MASK: tl.constexpr = 0x00F000F0
            MAGIC: tl.constexpr = 0x54005400  # 64.0
    if RSHIFT > 0:
        t = w2 >> RSHIFT  # the sign bits this copies into bits >= 23 are masked off below
    else:
        t = w2
    if DTYPE == tl.bfloat16:
        if H == 0:
            OFF2: tl.constexpr = 0x43084308  # 136 = 128 + 8
        else:
            OFF2: tl.constexpr = 0x41C041C0  # 24 = 16 + 8
        SUB: tl.constexpr = "sub.bf16x2"
    else:
        if H == 0:
            OFF2: tl.constexpr = 0x64086408  # 1032 = 1024 + 8
        else:
            OFF2: tl.constexpr = 0x54805480  # 72 = 64 + 8
        SUB: tl.constexpr = "sub.f16x2"
    if USE_ASM:
        ASM: tl.constexpr = f"""{{
            .reg .b32 c;
            lop3.b32 $0, $1, {MASK}, {MAGIC}, 0xEA;
            mov.b32 c, {OFF2};
            {SUB} $0, $0, c;
            }}"""
        if DTYPE == tl.bfloat16:
            return tl.inline_asm_elementwise(ASM, "=r,r,r", [t], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(ASM, "=r,r,r", [t], dtype=tl.float16, is_pure=True, pack=2)
    else:
        b = tl.arange(0, w2.shape[1]) % 2
        half = (t >> (16 * b)[None, :]) & 0xFFFF  # the first copy's low half, the second copy's high half
        v = ((half & (MASK & 0xFFFF)) | (MAGIC & 0xFFFF)).to(tl.int16).to(DTYPE, bitcast=True)
        return v - (_magic_offset(H, DTYPE) + 8.0)


@triton.jit
def _group_raw(s_ptr, z_ptr, g, pid_n, N, n_lim, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The scale row of group g over this program's columns (natural order) and its zero words; contiguous
    vector loads. Nothing is read when n_lim is 0."""
    nat = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s_row = tl.load(s_ptr + tl.multiple_of(g * N, 8) + nat, mask=nat < n_lim, other=0.0)
    zcol = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # word w holds columns 8 w .. 8 w + 7
    if HAS_ZEROS:
        z_row = tl.load(z_ptr + g * (N // 8) + zcol, mask=zcol * 8 < n_lim, other=0)
    else:
        z_row = zcol
    return s_row, z_row


@triton.jit
def _group_params(s_row, z_row, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 scales and z - 8 (0 without zero points) for the rows of the two halves (r = (tile, c, j),
    n = 64 tile + 16 j + 8 blk + c), permuted from the natural-order rows of _group_raw in registers."""
    NT: tl.constexpr = BLOCK_N // 64
    s4 = tl.permute(tl.reshape(s_row.to(tl.float32), [NT, 4, 2, 8]), (0, 3, 1, 2))  # [tile, c, j, blk]
    s0, s1 = tl.split(tl.reshape(s4, [BLOCK_N // 2, 2]))
    if HAS_ZEROS:
        z3 = tl.reshape(z_row, [NT, 1, 4, 2])  # [tile, 1, j, blk]: the word of columns 16 j + 8 blk + (0..7)
        shift = 4 * tl.arange(0, 8)[None, :, None, None]  # nibble c
        dz4 = ((z3 >> shift) & 15) - 8  # [tile, c, j, blk]
        dz0, dz1 = tl.split(tl.reshape(dz4.to(tl.float32), [BLOCK_N // 2, 2]))
    else:
        dz0 = tl.zeros_like(s0)
        dz1 = tl.zeros_like(s1)
    return s0, s1, dz0, dz1


@triton.jit
def nibble_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_qk,  # words per qweight row (one 16-row slab) = ceil(N / 64) * 128
    stride_om,  # row stride of out (= N, also for the fp32 partials)
    stride_split,  # elements between the split-K partial outputs (M * N)
    k_tiles_per_split,
    G: tl.constexpr,  # group size, 0 = channelwise (one group)
    HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of x per program (the dot's N: 16 .. 64)
    BLOCK_N: tl.constexpr,  # output columns per program, multiple of 64 (two halves of BLOCK_N / 2 rows)
    BLOCK_K: tl.constexpr,  # multiple of 32 (each dot has K = BLOCK_K / 2 >= 16)
    PARTIAL: tl.constexpr,  # out_ptr is fp32 split-K partials [split, M, N] (splitk_reduce_kernel sums them)
    USE_ASM: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
    fin_ptr=None,  # IN_REDUCE: the output [M, N]
    cnt_ptr=None,  # IN_REDUCE: int32 arrival counters, one per output tile, zero between launches
    split=1,  # IN_REDUCE: number of K splits
    IN_REDUCE: tl.constexpr = False,  # the last program of an output tile sums the partials (in split order)
    NUM_WARPS: tl.constexpr = 4,  # = num_warps (IN_REDUCE counts one increment per thread)
):
    """out^T tile = W^T tile @ x^T tile as four dots per K tile, one per (blk, h):

        p_blk += dot(A_blk_h [R, 2 Q], X_h [2 Q, BLOCK_M])   for h = 0, 1

    A_blk_h[r, 2 q + b] is nibble 4 b + 2 blk + h of word[r, q] (rows r = (tile, c, j), columns q = (slab,
    t4)), built elementwise from the words joined with themselves (the join is free: the pair is the k pair
    a thread holds), so the compiler loads each word once, straight into the dot-operand registers; X_h[(slab, t4, b), m] = x[m, 16 slab + 8 h + 2 t4 + b] is 8 contiguous
    k per slab, loaded (and pipelined) straight from x. Output row r of half blk is column
    n = 64 tile + 16 j + 8 blk + c.

    Scales: channelwise (G = 0) once in the epilogue; otherwise on the fp32 partial sums of each group. A K
    tile holding NGT > 1 groups runs its dots once per group against X with the other groups' rows masked
    off at the load (the dequantized weights stay in registers; no weight is multiplied by a scale).
    """
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    R: tl.constexpr = BLOCK_N // 2
    Q: tl.constexpr = BLOCK_K // 4
    S: tl.constexpr = BLOCK_K // 16
    if G > 0 and G < BLOCK_K:
        NGT: tl.constexpr = BLOCK_K // G  # groups per K tile
    else:
        NGT: tl.constexpr = 1

    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)

    # Rows r = (tile, c, j) of one blk half; the other half (blk = 1) is 8 columns further.
    r = tl.arange(0, R)
    tile = pid_n * (BLOCK_N // 64) + r // 32
    cc = (r // 4) % 8
    jj = r % 4
    n0 = tile * 64 + 16 * jj + cc
    n1 = n0 + 8
    word_r = tile * 128 + 16 * cc + jj
    tile_ok = tile < stride_qk // 128
    # Word columns q = (slab, t4).
    q = tl.arange(0, Q)
    word_q = 4 * (q % 4)
    slab_w = q // 4
    k_slabs = (K + 15) // 16
    # X_h rows (slab, t4, b): k = 16 slab + 8 h + (2 t4 + b).
    q2 = tl.arange(0, 2 * Q)
    slab_q = q2 // 8
    k_q = 16 * slab_q + q2 % 8

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    x_row = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm

    k_tile_begin = pid_k * k_tiles_per_split
    k_tile_end = tl.minimum(k_tile_begin + k_tiles_per_split, tl.cdiv(K, BLOCK_K))

    # Word offsets inside a K tile (the tile's base is added per iteration: a loop-carried pointer tensor
    # loses the 16-byte contiguity of j in the compiler's analysis), loop-carried x pointers.
    w_off = slab_w[None, :] * stride_qk + word_r[:, None] + word_q[None, :]
    x0_ptrs = x_row + (k_tile_begin * BLOCK_K + k_q)[:, None] * stride_xk
    w_mask = tile_ok[:, None]  # widened with the K bound on a partial last tile
    x_mask = m_ok[None, :]

    acc0 = tl.zeros([R, BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([R, BLOCK_M], dtype=tl.float32)
    ones = tl.full([R, 2 * Q], 1.0, DTYPE)
    if G == 0:
        # Channelwise: one group, its parameters loaded once for the whole K loop.
        s_cw, z_cw = _group_raw(s_ptr, z_ptr, 0, pid_n, N, N, HAS_ZEROS, BLOCK_N)
        s0, s1, dz0, dz1 = _group_params(s_cw, z_cw, HAS_ZEROS, BLOCK_N)
    if G > 0 and NGT == 1:
        # One group per K tile: its scales are prefetched one tile ahead (into registers).
        s_nxt, z_nxt = _group_raw(s_ptr, z_ptr, (k_tile_begin * BLOCK_K) // G, pid_n, N,
                                  tl.where(k_tile_begin < k_tile_end, N, 0), HAS_ZEROS, BLOCK_N)
    for kt in range(k_tile_begin, k_tile_end):
        k0 = kt * BLOCK_K
        if G > 0 and NGT == 1:
            s_cur = s_nxt
            z_cur = z_nxt
            s_nxt, z_nxt = _group_raw(s_ptr, z_ptr, (k0 + BLOCK_K) // G, pid_n, N,
                                      tl.where(kt + 1 < k_tile_end, N, 0), HAS_ZEROS, BLOCK_N)
        w_ptrs = qw_ptr + tl.cast(kt * S, tl.int64) * stride_qk + w_off
        if EVEN_K:
            words = tl.load(w_ptrs, mask=w_mask, other=0)
        else:
            words = tl.load(w_ptrs, mask=w_mask & (kt * S + slab_w < k_slabs)[None, :], other=0)
        # Every word twice side by side (the k pair b = 0, 1 of the dot operand): [R, 2 Q].
        w2 = tl.reshape(tl.join(words, words), [R, 2 * Q])
        a00 = _deq_pair(w2, 0, DTYPE, USE_ASM)  # blk 0, h 0: v0 + q
        a01 = _deq_pair(w2, 1, DTYPE, USE_ASM)  # blk 0, h 1: v1 + q
        a10 = _deq_pair(w2, 2, DTYPE, USE_ASM)  # blk 1, h 0
        a11 = _deq_pair(w2, 3, DTYPE, USE_ASM)  # blk 1, h 1
        for gi in tl.static_range(NGT):
            if EVEN_K:
                xmask0 = x_mask
                xmask1 = x_mask
            else:  # (K % 16 != 0 only for channelwise G = K: X_1's rows k + 8 need their own bound)
                xmask0 = x_mask & (k0 + k_q < K)[:, None]
                xmask1 = x_mask & (k0 + k_q + 8 < K)[:, None]
            if NGT > 1:
                xmask0 = xmask0 & (slab_q // (G // 16) == gi)[:, None]
                xmask1 = xmask1 & (slab_q // (G // 16) == gi)[:, None]
            x0 = tl.load(x0_ptrs, mask=xmask0, other=0.0)
            x1 = tl.load(x0_ptrs + 8 * stride_xk, mask=xmask1, other=0.0)
            if G > 0 and NGT == 1:
                s0, s1, dz0, dz1 = _group_params(s_cur, z_cur, HAS_ZEROS, BLOCK_N)
            elif G > 0:
                g = k0 // G + gi
                n_lim = tl.where(g * G < K, N, 0)  # a group past K (last tile) reads nothing
                s_row, z_row = _group_raw(s_ptr, z_ptr, g, pid_n, N, n_lim, HAS_ZEROS, BLOCK_N)
                s0, s1, dz0, dz1 = _group_params(s_row, z_row, HAS_ZEROS, BLOCK_N)
            if HAS_ZEROS:
                # Rank-1 correction -(z - 8) * colsum(x) while every column sum of x is finite (weights stay in
                # registers); the exact q - z weights only in a tile where an Inf would give Inf - Inf = NaN.
                xs = tl.dot(ones, x0)
                xs = tl.dot(ones, x1, xs)
                finite = tl.max(tl.where(xs == xs, tl.abs(xs), float("inf"))) < float("inf")
                if finite:
                    p0 = tl.dot(a00, x0)
                    p0 = tl.dot(a01, x1, p0)
                    p1 = tl.dot(a10, x0)
                    p1 = tl.dot(a11, x1, p1)
                    p0 = p0 - dz0[:, None] * xs
                    p1 = p1 - dz1[:, None] * xs
                else:
                    e0 = dz0.to(DTYPE)[:, None]
                    e1 = dz1.to(DTYPE)[:, None]
                    p0 = tl.dot(a00 - e0, x0)
                    p0 = tl.dot(a01 - e0, x1, p0)
                    p1 = tl.dot(a10 - e1, x0)
                    p1 = tl.dot(a11 - e1, x1, p1)
            else:
                p0 = tl.dot(a00, x0)
                p0 = tl.dot(a01, x1, p0)
                p1 = tl.dot(a10, x0)
                p1 = tl.dot(a11, x1, p1)
            if G == 0:
                acc0 += p0
                acc1 += p1
            else:
                acc0 += p0 * s0[:, None]
                acc1 += p1 * s1[:, None]
        x0_ptrs += BLOCK_K * stride_xk

    if G == 0:
        acc0 = acc0 * s0[:, None]
        acc1 = acc1 * s1[:, None]

    o_off = offs_m[None, :].to(tl.int64) * stride_om
    n0_ok = n0 < N
    n1_ok = n1 < N
    if not PARTIAL:
        tl.store(out_ptr + o_off + n0[:, None], acc0.to(DTYPE), mask=n0_ok[:, None] & m_ok[None, :])
        tl.store(out_ptr + o_off + n1[:, None], acc1.to(DTYPE), mask=n1_ok[:, None] & m_ok[None, :])
    else:
        part = out_ptr + pid_k.to(tl.int64) * stride_split + o_off
        tl.store(part + n0[:, None], acc0, mask=n0_ok[:, None] & m_ok[None, :])
        tl.store(part + n1[:, None], acc1, mask=n1_ok[:, None] & m_ok[None, :])
        if IN_REDUCE:
            # Deterministic single-kernel split-K: every thread increments the tile's counter once (release:
            # its partial stores are visible first); the program that made the last of the split * THREADS
            # increments re-reads the counter with acquire semantics in every thread, sums the partials in
            # split order (as splitk_reduce_kernel does: bit-identical results), writes the output and
            # resets the counter to zero for the next launch.
            THREADS: tl.constexpr = 32 * NUM_WARPS
            cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
            tl.debug_barrier()
            one = tl.full([THREADS], 1, tl.int32)
            old = tl.atomic_add(cnt + tl.zeros([THREADS], tl.int32), one, sem="acq_rel", scope="gpu")
            if tl.max(old, axis=0) == split * THREADS - 1:
                tl.atomic_add(cnt + tl.zeros([THREADS], tl.int32), 0 * one, sem="acquire", scope="gpu")
                tl.debug_barrier()
                base = out_ptr + o_off
                r0 = tl.zeros([R, BLOCK_M], dtype=tl.float32)
                r1 = tl.zeros([R, BLOCK_M], dtype=tl.float32)
                for sp in range(0, split):
                    r0 += tl.load(base + sp * stride_split + n0[:, None], mask=n0_ok[:, None] & m_ok[None, :],
                                  other=0.0, cache_modifier=".cg")
                    r1 += tl.load(base + sp * stride_split + n1[:, None], mask=n1_ok[:, None] & m_ok[None, :],
                                  other=0.0, cache_modifier=".cg")
                tl.store(fin_ptr + o_off + n0[:, None], r0.to(DTYPE), mask=n0_ok[:, None] & m_ok[None, :])
                tl.store(fin_ptr + o_off + n1[:, None], r1.to(DTYPE), mask=n1_ok[:, None] & m_ok[None, :])
                tl.debug_barrier()
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


# --------------------------------------------------------------------------------------------------------
# Large-M kernel: x @ W with the dequantized weight tile as the shared-memory B operand
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _expand_tile(words, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """words [R4 (tile, j), 8 (c), S, 4 (t4)] -> (q - 8) as [BLOCK_N, BLOCK_K] in natural (n, k) order."""
    e00 = tl.join(_deq_nibble(words, 0, DTYPE), _deq_nibble(words, 4, DTYPE))  # blk 0, h 0: [.., b]
    e01 = tl.join(_deq_nibble(words, 1, DTYPE), _deq_nibble(words, 5, DTYPE))  # blk 0, h 1
    e10 = tl.join(_deq_nibble(words, 2, DTYPE), _deq_nibble(words, 6, DTYPE))  # blk 1, h 0
    e11 = tl.join(_deq_nibble(words, 3, DTYPE), _deq_nibble(words, 7, DTYPE))  # blk 1, h 1
    e0 = tl.join(e00, e01)  # [R4, c, S, t4, b, h]
    e1 = tl.join(e10, e11)
    e = tl.join(e0, e1)  # [R4, c, S, t4, b, h, blk]
    e = tl.permute(e, (0, 6, 1, 2, 5, 3, 4))  # [R4, blk, c, S, h, t4, b]
    return tl.reshape(e, [BLOCK_N, BLOCK_K])


@triton.jit
def dense_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qk, stride_om, stride_split, k_tiles_per_split,
    G: tl.constexpr,  # group size, 0 = channelwise
    HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # multiple of 64
    BLOCK_K: tl.constexpr,  # multiple of 16; BLOCK_K % G == 0 or G % BLOCK_K == 0
    PARTIAL: tl.constexpr,  # write fp32 split-K partials [split, M, N]
    GROUP_M: tl.constexpr,  # programs along M that share a column block (L2 reuse of weights)
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    S: tl.constexpr = BLOCK_K // 16
    NT4: tl.constexpr = BLOCK_N // 16
    if G > 0 and G < BLOCK_K:
        NGT: tl.constexpr = BLOCK_K // G  # groups per K tile
    else:
        NGT: tl.constexpr = 1

    # Grouped launch order: GROUP_M row blocks run against the same column blocks.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    # Words [NT4 (tile, j), 8 (c), S, 4 (t4)].
    r4 = tl.arange(0, NT4)
    tile = pid_n * (BLOCK_N // 64) + r4 // 4
    tile_ok = tile < stride_qk // 128
    cc = tl.arange(0, 8)
    word_n = tile[:, None] * 128 + cc[None, :] * 16 + (r4 % 4)[:, None]
    sl = tl.arange(0, S)
    t4 = tl.arange(0, 4)
    k_slabs = (K + 15) // 16

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    if G == 0:
        s_n = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
        if HAS_ZEROS:
            zw = tl.load(z_ptr + offs_n // 8, mask=n_ok, other=0)
            dz = ((((zw >> (4 * (offs_n % 8))) & 15) - 8).to(tl.float32)).to(DTYPE)

    k_tile_begin = pid_k * k_tiles_per_split
    k_tile_end = tl.minimum(k_tile_begin + k_tiles_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(k_tile_begin, k_tile_end):
        k0 = kt * BLOCK_K
        slab = kt * S + sl
        words = tl.load(
            qw_ptr + slab[None, None, :, None].to(tl.int64) * stride_qk + word_n[:, :, None, None]
            + 4 * t4[None, None, None, :],
            mask=tile_ok[:, None, None, None] & (slab < k_slabs)[None, None, :, None],
            other=0,
        )
        kk = k0 + offs_k
        xa = tl.load(x_row + kk[None, :] * stride_xk, mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        wq = _expand_tile(words, DTYPE, BLOCK_N, BLOCK_K)  # [BLOCK_N, BLOCK_K], q - 8
        if G == 0:
            if HAS_ZEROS:
                wq = wq - dz[:, None]
        else:
            # Groups g0 .. g0 + NGT - 1 of this K tile, scales and zeros as [BLOCK_N, NGT].
            g = k0 // G + tl.arange(0, NGT)
            gn_ok = n_ok[:, None] & (g * G < K)[None, :]
            s_g = tl.load(s_ptr + tl.multiple_of(g * N, 8)[None, :] + offs_n[:, None], mask=gn_ok, other=0.0)
            w3 = tl.reshape(wq, [BLOCK_N, NGT, BLOCK_K // NGT])
            if HAS_ZEROS:
                zw = tl.load(z_ptr + g[None, :] * (N // 8) + (offs_n // 8)[:, None], mask=gn_ok, other=0)
                dz = ((((zw >> (4 * (offs_n % 8))[:, None]) & 15) - 8).to(tl.float32)).to(DTYPE)
                w3 = w3 - dz[:, :, None]
            w3 = w3 * s_g[:, :, None]
            wq = tl.reshape(w3, [BLOCK_N, BLOCK_K])
        acc = tl.dot(xa, tl.trans(wq), acc)

    if G == 0:
        acc = acc * s_n.to(tl.float32)[None, :]
    o_off = offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    if not PARTIAL:
        tl.store(out_ptr + o_off, acc.to(DTYPE), mask=o_mask)
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * stride_split + o_off, acc, mask=o_mask)


# --------------------------------------------------------------------------------------------------------
# Large-M alternative: dequantize into a dense [K, N] weight (then a dense GEMM)
# --------------------------------------------------------------------------------------------------------


@triton.jit
def dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr,
    K, N, stride_qk,
    G: tl.constexpr,  # group size, 0 = channelwise
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # multiple of 64
    BLOCK_K: tl.constexpr,  # multiple of 16
):
    """w[k, n] = (q - z) * s rounded once to the dtype of w (row-major [K, N])."""
    DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    S: tl.constexpr = BLOCK_K // 16
    NT4: tl.constexpr = BLOCK_N // 16
    if G > 0 and G < BLOCK_K:
        NGT: tl.constexpr = BLOCK_K // G
    else:
        NGT: tl.constexpr = 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    r4 = tl.arange(0, NT4)
    tile = pid_n * (BLOCK_N // 64) + r4 // 4
    tile_ok = tile < stride_qk // 128
    cc = tl.arange(0, 8)
    word_n = tile[:, None] * 128 + cc[None, :] * 16 + (r4 % 4)[:, None]
    slab = pid_k * S + tl.arange(0, S)
    t4 = tl.arange(0, 4)
    words = tl.load(
        qw_ptr + slab[None, None, :, None].to(tl.int64) * stride_qk + word_n[:, :, None, None] + 4 * t4[None, None, None, :],
        mask=tile_ok[:, None, None, None] & (slab < (K + 15) // 16)[None, None, :, None],
        other=0,
    )
    wq = _expand_tile(words, DTYPE, BLOCK_N, BLOCK_K)  # q - 8, [BLOCK_N, BLOCK_K]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if G == 0:
        g = tl.zeros([NGT], dtype=tl.int32)
    else:
        g = (pid_k * BLOCK_K) // G + tl.arange(0, NGT)
    gn_ok = n_ok[:, None] & (g * tl.maximum(G, 1) < K)[None, :]
    s_g = tl.load(s_ptr + tl.multiple_of(g * N, 8)[None, :] + offs_n[:, None], mask=gn_ok, other=0.0)
    w3 = tl.reshape(wq, [BLOCK_N, NGT, BLOCK_K // NGT])
    if HAS_ZEROS:
        zw = tl.load(z_ptr + g[None, :] * (N // 8) + (offs_n // 8)[:, None], mask=gn_ok, other=0)
        dz = ((((zw >> (4 * (offs_n % 8))[:, None]) & 15) - 8).to(tl.float32)).to(DTYPE)
        w3 = w3 - dz[:, :, None]
    w3 = w3 * s_g[:, :, None]
    w = tl.trans(tl.reshape(w3, [BLOCK_N, BLOCK_K]))  # [BLOCK_K, BLOCK_N]
    tl.store(w_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :], w,
             mask=(offs_k < K)[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------------------
# Split-K reduction
# --------------------------------------------------------------------------------------------------------


@triton.jit
def splitk_reduce_kernel(part_ptr, out_ptr, numel, split, BLOCK: tl.constexpr):
    """out[i] = part[0, i] + part[1, i] + ... + part[split - 1, i], in this order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in range(1, split):
        acc += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
