"""Triton kernels of the Triton backend. Imported lazily by triton.py: importing w4a16_ops never needs triton.

Two GEMM kernels (triton.py picks one and its configuration by M) and the split-K reduction:

* ``nibble_gemm_kernel`` (decode and medium M): out^T = W^T @ x^T ("swap AB"). The dequantized weight
  is the A operand of tl.dot, which lives in registers (on Hopper, wgmma reads A from registers), so the
  weights never take a round trip through shared memory after dequantization, and the weight dimension
  fills the tensor core's M = 64 while the few rows of x become its small N. Split-K over a third grid axis.
* ``dense_gemm_kernel`` (large M): out = x @ W with the dequantized weight tile as the B operand (shared
  memory, as wgmma requires), amortized over a large M tile.
* ``splitk_reduce_kernel``: sums the fp32 split-K partials in a fixed order (bit-deterministic).

Reading the packed format (w4a16_ops/format.py) without repacking. In a 16 x 64 tile,

    word   = 16 c + 4 t4 + j           kk = k % 16 = 8 h + 2 t4 + b
    nibble = 4 b + 2 blk + h           nn = n % 64 = 16 j + 8 blk + c

nibble_gemm_kernel never expands a word into a bigger tensor (reshapes and broadcasts would force the
compiler to shuffle the weights through shared memory). It loads the words as a 2-D tile Wd[r, q] with
rows r = (64-column tile, c, j) (j fastest: 4 consecutive words, one 16-byte vector) and columns
q = (slab, t4), and computes EIGHT dots per K tile, one per nibble i = (b, blk, h):

    acc_blk[r, m] += sum over (h, b) of  deq_i(Wd)[r, q] * x[m, 16 slab + 8 h + 2 t4 + b]

where deq_i is elementwise (so the compiler loads Wd straight into the dot-operand register layout) and
the four x slices (h, b) are cut from the natural x tile. Output rows are n = 64 tile + 16 j + 8 blk + c.

Dequantization without int->float conversion: (q | 0x6400) read as fp16 is 1024 + q and (q | 0x4300)
read as bf16 is 128 + q, both exact; subtracting (MAGIC + 8) gives the exact integer q - 8. The zero
point enters as a rank-1 correction (q - z = (q - 8) - (z - 8)): acc -= (z - 8) * s * sum_k x. Scales are
applied to the fp32 partial sums of each group (a K tile with several groups runs its dots once per
group against x with the other groups' rows zeroed) or once at the end for channelwise G = K.

On the GPU (USE_ASM) one inline-asm instance turns a pair of words (the two k columns a thread holds in
the dot-operand layout) into two f16x2/bf16x2 registers per byte: prmt + 2 lop3 + 2 packed subtracts for
4 weights. The interpreter (CPU tests) runs the same math in plain Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------------------
# Dequantization helpers
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _magic(DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        return 0x4300
    else:
        return 0x6400


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
def _deq_byte(words, E: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """(q - 8) of nibbles 2E (low) and 2E + 1 (high) of every word: two DTYPE tensors of words' shape.

    With USE_ASM, pairs of consecutive elements (the k pair a thread holds in the dot-operand layout)
    are packed into f16x2 / bf16x2: prmt gathers byte E of both words, one lop3 per nibble inserts it
    into the mantissa of a magic number (1024 + q for the low nibble, 64 + q for the high one in fp16; bf16
    has 7 mantissa bits, so its high nibble is shifted down first and both use 128 + q) and a packed
    subtract removes magic + 8.
    """
    if USE_ASM:
        SEL: tl.constexpr = E | (E << 4) | ((4 + E) << 8) | ((4 + E) << 12)
        if DTYPE == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(
                asm=f"""{{
                .reg .b32 t, c0, c1;
                prmt.b32 t, $2, $3, {SEL};
                lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA;
                shr.u32 t, t, 4;
                lop3.b32 $1, t, 0x000F000F, 0x43004300, 0xEA;
                mov.b32 c0, 0x43084308;
                sub.bf16x2 $0, $0, c0;
                sub.bf16x2 $1, $1, c0;
                }}""",
                constraints="=r,=r,r,r",
                args=[words],
                dtype=(tl.bfloat16, tl.bfloat16),
                is_pure=True,
                pack=2,
            )
        else:
            lo, hi = tl.inline_asm_elementwise(
                asm=f"""{{
                .reg .b32 t, c0, c1;
                prmt.b32 t, $2, $3, {SEL};
                lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA;
                lop3.b32 $1, t, 0x00F000F0, 0x54005400, 0xEA;
                mov.b32 c0, 0x64086408;
                mov.b32 c1, 0x54805480;
                sub.f16x2 $0, $0, c0;
                sub.f16x2 $1, $1, c1;
                }}""",
                constraints="=r,=r,r,r",
                args=[words],
                dtype=(tl.float16, tl.float16),
                is_pure=True,
                pack=2,
            )
        return lo, hi
    else:
        return _deq_nibble(words, 2 * E, DTYPE), _deq_nibble(words, 2 * E + 1, DTYPE)


@triton.jit
def _x_slices(xt, S: tl.constexpr, BLOCK_M: tl.constexpr):
    """x^T tile [16 S, BLOCK_M] (rows k = 16 s + 8 h + 2 t4 + b) -> four [4 S, BLOCK_M] slices
    x_hb (rows q = 4 s + t4), returned as (x00, x01, x10, x11) with index (h, b)."""
    x5 = tl.reshape(xt, [S, 2, 4, 2, BLOCK_M])
    x5 = tl.permute(x5, (0, 2, 4, 1, 3))  # [s, t4, m, h, b]
    x4 = tl.reshape(x5, [4 * S, BLOCK_M, 2, 2])
    x_b0, x_b1 = tl.split(x4)  # [q, m, h]
    x00, x10 = tl.split(x_b0)
    x01, x11 = tl.split(x_b1)
    return x00, x01, x10, x11


# --------------------------------------------------------------------------------------------------------
# Decode / medium-M kernel: weights as the register A operand, one dot per nibble
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _nibble_dots(w00_h0, w00_h1, w01_h0, w01_h1, w10_h0, w10_h1, w11_h0, w11_h1, x00, x01, x10, x11):
    """The eight nibble dots of one K tile: partial sums for the blk = 0 and blk = 1 output rows."""
    p0 = tl.dot(w00_h0, x00)
    p0 = tl.dot(w10_h0, x01, p0)
    p0 = tl.dot(w00_h1, x10, p0)
    p0 = tl.dot(w10_h1, x11, p0)
    p1 = tl.dot(w01_h0, x00)
    p1 = tl.dot(w11_h0, x01, p1)
    p1 = tl.dot(w01_h1, x10, p1)
    p1 = tl.dot(w11_h1, x11, p1)
    return p0, p1


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
    """fp32 scales and (z - 8) for the rows of the two halves (r = (tile, c, j), n = 64 tile + 16 j + 8 blk
    + c), permuted from the natural-order rows of _group_raw in registers."""
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
    BLOCK_N: tl.constexpr,  # output columns per program, multiple of 64 (two dots of BLOCK_N / 2 rows)
    BLOCK_K: tl.constexpr,  # multiple of 64 (each nibble dot has K = BLOCK_K / 4 >= 16)
    PARTIAL: tl.constexpr,  # out_ptr is fp32 split-K partials [split, M, N] (splitk_reduce_kernel sums them)
    USE_ASM: tl.constexpr,
):
    """Scales: channelwise (G = 0) once in the epilogue; otherwise on the fp32 partial sums of each group.
    A K tile holding NGT > 1 groups runs the eight dots once per group against x with the other groups'
    rows zeroed: the dequantized weights stay in registers, the tensor cores (idle at small M) do the
    extra work, and no weight is ever multiplied by a scale."""
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
    # Columns q = (slab, t4).
    q = tl.arange(0, Q)
    word_q = 4 * (q % 4)
    slab_q = q // 4
    k_slabs = (K + 15) // 16

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm

    k_tile_begin = pid_k * k_tiles_per_split
    k_tile_end = tl.minimum(k_tile_begin + k_tiles_per_split, tl.cdiv(K, BLOCK_K))

    acc0 = tl.zeros([R, BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([R, BLOCK_M], dtype=tl.float32)
    xsum_all = tl.zeros([BLOCK_M], dtype=tl.float32)
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
        slab = kt * S + slab_q
        words = tl.load(
            qw_ptr + slab[None, :].to(tl.int64) * stride_qk + word_r[:, None] + word_q[None, :],
            mask=tile_ok[:, None] & (slab < k_slabs)[None, :],
            other=0,
        )
        kk = k0 + offs_k
        xt = tl.load(x_row + kk[:, None] * stride_xk, mask=(kk < K)[:, None] & m_ok[None, :], other=0.0)

        # nibble = 4 b + 2 blk + h; byte E = 2 b + blk holds (h = 0, h = 1).
        w00_h0, w00_h1 = _deq_byte(words, 0, DTYPE, USE_ASM)  # b 0, blk 0
        w01_h0, w01_h1 = _deq_byte(words, 1, DTYPE, USE_ASM)  # b 0, blk 1
        w10_h0, w10_h1 = _deq_byte(words, 2, DTYPE, USE_ASM)  # b 1, blk 0
        w11_h0, w11_h1 = _deq_byte(words, 3, DTYPE, USE_ASM)  # b 1, blk 1

        if G == 0:
            x00, x01, x10, x11 = _x_slices(xt, S, BLOCK_M)
            p0, p1 = _nibble_dots(w00_h0, w00_h1, w01_h0, w01_h1, w10_h0, w10_h1, w11_h0, w11_h1,
                                  x00, x01, x10, x11)
            acc0 += p0
            acc1 += p1
            if HAS_ZEROS:
                xsum_all += tl.sum(xt.to(tl.float32), axis=0)
        else:
            x00, x01, x10, x11 = _x_slices(xt, S, BLOCK_M)
            for gi in tl.static_range(NGT):
                g = k0 // G + gi
                if NGT == 1:
                    xg = xt
                    p0, p1 = _nibble_dots(w00_h0, w00_h1, w01_h0, w01_h1, w10_h0, w10_h1, w11_h0, w11_h1,
                                          x00, x01, x10, x11)
                else:
                    xg = tl.where((offs_k // G == gi)[:, None], xt, 0.0)
                    in_g = (slab_q // (G // 16) == gi)[:, None]  # slice rows q = (slab, t4) of group gi
                    p0, p1 = _nibble_dots(w00_h0, w00_h1, w01_h0, w01_h1, w10_h0, w10_h1, w11_h0, w11_h1,
                                          tl.where(in_g, x00, 0.0), tl.where(in_g, x01, 0.0),
                                          tl.where(in_g, x10, 0.0), tl.where(in_g, x11, 0.0))
                if NGT == 1:
                    s0, s1, dz0, dz1 = _group_params(s_cur, z_cur, HAS_ZEROS, BLOCK_N)
                else:
                    n_lim = tl.where(g * G < K, N, 0)  # a group past K (last tile) reads nothing
                    s_row, z_row = _group_raw(s_ptr, z_ptr, g, pid_n, N, n_lim, HAS_ZEROS, BLOCK_N)
                    s0, s1, dz0, dz1 = _group_params(s_row, z_row, HAS_ZEROS, BLOCK_N)
                if HAS_ZEROS:
                    xsum = tl.sum(xg.to(tl.float32), axis=0)
                    p0 -= dz0[:, None] * xsum[None, :]
                    p1 -= dz1[:, None] * xsum[None, :]
                acc0 += p0 * s0[:, None]
                acc1 += p1 * s1[:, None]

    if G == 0:
        s_row, z_row = _group_raw(s_ptr, z_ptr, 0, pid_n, N, N, HAS_ZEROS, BLOCK_N)
        s0, s1, dz0, dz1 = _group_params(s_row, z_row, HAS_ZEROS, BLOCK_N)
        if HAS_ZEROS:
            acc0 -= dz0[:, None] * xsum_all[None, :]
            acc1 -= dz1[:, None] * xsum_all[None, :]
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
