// A small CUDA emulation for running the project's kernel source on the CPU, in tests only.
//
// Each CUDA thread of a block is a fiber (started with ucontext, switched with _setjmp/_longjmp) with its own stack; the blocks of a grid run one after the
// other. __syncthreads() and the warp shuffles are real rendezvous points: a fiber that reaches one yields to the
// block's scheduler, which resumes the waiting fibers only when every live thread of the block (or lane of the
// warp) has arrived. A barrier that can never complete (divergent __syncthreads, a shuffle with an exited lane)
// aborts with a message instead of hanging. __shared__ becomes a function-level static: one copy, used by one
// block at a time. Launch syntax `k<<<g, b, s, t>>>(args)` is rewritten mechanically to
// `::cuda_emu::Launch(g, b, s, t)(k, args)` by tests/kernel_host/build.py.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef void* cudaStream_t;
typedef int cudaError_t;
enum { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == 0 ? "no error" : "emulated CUDA error"; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
    std::memset(p, v, n);
    return cudaSuccess;
}

namespace cuda_emu {

enum State { RUNNING, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
    ucontext_t ctx;  // only to start the fiber on its own stack; switches use _setjmp/_longjmp (no syscall)
    jmp_buf jump;
    bool started;
    uint3 tid;
    unsigned linear;
    State state;
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>> stacks;
    std::vector<double> slots;  // one shuffle value per thread
    ucontext_t scheduler;
    jmp_buf scheduler_jump;
    Fiber* current = nullptr;
    uint3 idx, dim, grid;
    void (*entry)(void*) = nullptr;
    void* entry_arg = nullptr;
};

inline Block* g_block = nullptr;
constexpr size_t kStack = 64 * 1024;

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u)\n", what, g_block->idx.x, g_block->idx.y, g_block->idx.z);
    std::abort();
}

inline void trampoline() {
    g_block->entry(g_block->entry_arg);
    g_block->current->state = DONE;
    _longjmp(g_block->scheduler_jump, 1);  // never returns
}

inline void yield(State s) {
    Fiber* f = g_block->current;
    f->state = s;
    if (!_setjmp(f->jump)) _longjmp(g_block->scheduler_jump, 1);
}

inline void resume(Block& b, Fiber& f) {
    b.current = &f;
    if (!_setjmp(b.scheduler_jump)) {
        if (f.started) {
            _longjmp(f.jump, 1);
        } else {
            f.started = true;
            swapcontext(&b.scheduler, &f.ctx);
        }
    }
}

// Run every fiber of the block to completion, releasing barriers when they are complete.
inline void run_block() {
    Block& b = *g_block;
    const size_t n = b.fibers.size();
    for (;;) {
        for (size_t i = 0; i < n; ++i) {
            Fiber& f = b.fibers[i];
            if (f.state != RUNNING) continue;
            resume(b, f);
        }
        size_t done = 0, barrier = 0;
        for (auto& f : b.fibers) {
            done += f.state == DONE;
            barrier += f.state == AT_BARRIER;
        }
        if (done == n) return;
        bool released = false;
        if (barrier > 0 && barrier + done == n) {  // every live thread arrived (exited ones count as arrived)
            for (auto& f : b.fibers)
                if (f.state == AT_BARRIER) f.state = RUNNING;
            released = true;
        }
        for (size_t w = 0; w * 32 < n; ++w) {  // warps: lanes 32w .. 32w+31
            size_t lo = w * 32, hi = lo + 32 < n ? lo + 32 : n, waiting = 0, exited = 0;
            for (size_t i = lo; i < hi; ++i) {
                waiting += b.fibers[i].state == AT_WARP;
                exited += b.fibers[i].state == DONE;
            }
            if (waiting == 0) continue;
            if (waiting + exited == hi - lo) {
                if (exited) fail("warp shuffle with a full mask after some lanes of the warp exited");
                for (size_t i = lo; i < hi; ++i) b.fibers[i].state = RUNNING;
                released = true;
            }
        }
        if (!released) fail("deadlock: threads wait at a barrier that can never complete");
    }
}

template <class Tuple, class Kernel>
struct Call {
    Kernel kernel;
    Tuple* params;
    static void run(void* self) {
        auto* c = static_cast<Call*>(self);
        std::apply(c->kernel, *c->params);
    }
};

struct Launch {
    dim3 grid, block;
    Launch(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {
        // CUDA_EMU_MAX_GRID: pretend the device allows only this many blocks along x for 1-D launches (one row of
        // threads per block), whose kernels stride over the grid: exercises their grid-stride loops.
        if (const char* cap = std::getenv("CUDA_EMU_MAX_GRID")) {
            unsigned c = static_cast<unsigned>(std::strtoul(cap, nullptr, 10));
            if (c > 0 && block.y == 1 && block.z == 1 && grid.y == 1 && grid.x > c) grid.x = c;
        }
    }

    template <class... P, class... A>
    void operator()(void (*kernel)(P...), A&&... args) {
        std::tuple<P...> params(static_cast<P>(args)...);
        Call<std::tuple<P...>, void (*)(P...)> call{kernel, &params};
        Block b;
        const unsigned n = block.x * block.y * block.z;
        b.fibers.resize(n);
        b.stacks.assign(n, std::vector<char>(kStack));
        b.slots.assign(n, 0.0);
        b.dim = {block.x, block.y, block.z};
        b.grid = {grid.x, grid.y, grid.z};
        b.entry = &decltype(call)::run;
        b.entry_arg = &call;
        Block* saved = g_block;
        g_block = &b;
        for (unsigned bz = 0; bz < grid.z; ++bz)
            for (unsigned by = 0; by < grid.y; ++by)
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    b.idx = {bx, by, bz};
                    for (unsigned t = 0; t < n; ++t) {
                        Fiber& f = b.fibers[t];
                        f.linear = t;
                        f.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        f.state = RUNNING;
                        f.started = false;
                        getcontext(&f.ctx);
                        f.ctx.uc_stack.ss_sp = b.stacks[t].data();
                        f.ctx.uc_stack.ss_size = kStack;
                        f.ctx.uc_link = &b.scheduler;
                        makecontext(&f.ctx, trampoline, 0);
                    }
                    run_block();
                }
        g_block = saved;
    }
};

inline unsigned lane() { return g_block->current->linear % 32; }

// One shuffle: every lane publishes its value, all lanes of the warp meet, each reads its source lane's value,
// and all meet again before any slot can be overwritten by the next shuffle.
template <class T>
inline T shuffle(T v, unsigned src_lane, unsigned mask) {
    if (mask != 0xffffffffu) fail("only full-mask shuffles are emulated");
    Block& b = *g_block;
    const unsigned me = b.current->linear, base = me - me % 32;
    b.slots[me] = static_cast<double>(v);
    yield(AT_WARP);
    const T out = static_cast<T>(b.slots[base + (src_lane % 32)]);
    yield(AT_WARP);
    return out;
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::g_block->current->tid)
#define blockIdx (::cuda_emu::g_block->idx)
#define blockDim (::cuda_emu::g_block->dim)
#define gridDim (::cuda_emu::g_block->grid)

inline void __syncthreads() { ::cuda_emu::yield(::cuda_emu::AT_BARRIER); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int laneMask, int = 32) {
    return ::cuda_emu::shuffle(v, ::cuda_emu::lane() ^ laneMask, mask);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int = 32) {
    unsigned l = ::cuda_emu::lane();
    return ::cuda_emu::shuffle(v, l + delta < 32 ? l + delta : l, mask);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int = 32) {
    unsigned l = ::cuda_emu::lane();
    return ::cuda_emu::shuffle(v, l >= delta ? l - delta : l, mask);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int = 32) {
    return ::cuda_emu::shuffle(v, static_cast<unsigned>(src), mask);
}
