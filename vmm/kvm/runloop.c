/*
 * The C vCPU run loop. See runloop.h for the contract.
 *
 * It is called from Python through cffi, which releases the GIL for the
 * duration of the call: while the guest runs, other Python threads (devices,
 * the console, signal handling) run freely.
 */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include "runloop.h"

uint64_t vmm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct vmm_port_rule *find_rule(struct vmm_loop *loop, uint16_t port)
{
    for (uint32_t i = 0; i < loop->nrules; i++)
        if (loop->rules[i].port == port)
            return &loop->rules[i];
    return NULL;
}

/*
 * Try to complete a port-I/O exit from the rule table. Returns 1 when done,
 * 2 when done and a newline went into the output buffer, 0 when Python must
 * handle it (no rule, or the output buffer has no room).
 */
static int complete_io(struct vmm_loop *loop)
{
    struct kvm_run *run = loop->run;
    struct vmm_port_rule *rule = find_rule(loop, run->io.port);
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint32_t nbytes = (uint32_t)run->io.size * run->io.count;

    if (rule == NULL)
        return 0;
    if (run->io.direction == KVM_EXIT_IO_OUT) {
        switch (rule->on_write) {
        case VMM_WRITE_DISCARD:
            break;
        case VMM_WRITE_BUFFER:
            /* Only the low byte of each access is console data. */
            if (loop->output_len + run->io.count > VMM_OUTPUT_BUFFER_SIZE)
                return 0;
            for (uint32_t i = 0; i < run->io.count; i++)
                loop->output[loop->output_len++] = data[i * run->io.size];
            rule->hits++;
            return loop->output[loop->output_len - 1] == '\n' ? 2 : 1;
        default:
            return 0;
        }
    } else {
        if (rule->on_read != VMM_READ_CONSTANT)
            return 0;
        for (uint32_t off = 0; off < nbytes; off += run->io.size)
            memcpy(data + off, &rule->read_value, run->io.size);
    }
    rule->hits++;
    return 1;
}

/* One KVM_RUN, timed. Returns the ioctl's result; errno kept in last_errno. */
int vmm_kvm_run_once(struct vmm_loop *loop)
{
    uint64_t start = vmm_now_ns();
    int rc = ioctl(loop->vcpu_fd, KVM_RUN, 0);
    int saved = errno;
    loop->ns_in_kvm_run += vmm_now_ns() - start;
    if (rc < 0) {
        loop->last_errno = saved;
        errno = saved;
    } else {
        loop->exits_total++;
    }
    return rc;
}

int vmm_run_loop(struct vmm_loop *loop)
{
    uint64_t outside_since = vmm_now_ns();
    for (;;) {
        loop->ns_in_c_loop += vmm_now_ns() - outside_since;
        int rc = vmm_kvm_run_once(loop);
        outside_since = vmm_now_ns();
        if (rc < 0) {
            /* Python decides whether to stop or go on (and clears
             * immediate_exit if it goes on): a stop request must not be lost. */
            if (loop->last_errno == EINTR || loop->last_errno == EAGAIN)
                return VMM_LOOP_INTERRUPTED;
            return VMM_LOOP_ERROR;
        }
        if (loop->run->exit_reason != KVM_EXIT_IO)
            return VMM_LOOP_EXIT;
        int done = complete_io(loop);
        if (done == 0)
            return VMM_LOOP_EXIT;
        loop->exits_in_c++;
        if (done == 2)
            return VMM_LOOP_OUTPUT;
    }
}
