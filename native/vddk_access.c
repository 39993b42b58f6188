/*
 * vddk_access.c -- the connection parameters and the calls that need no disk: where the
 * credentials are copied for VDDK and wiped again (vddk_params_*, also used by vddk_open for
 * ConnectEx), and the job bracket PrepareForAccess / Cleanup / EndAccess.
 */
#define _GNU_SOURCE
#include "vddk_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* Connection parameters                                                                     */
/* ---------------------------------------------------------------------------------------- */

void vddk_params_free(vddk_params *pp)
{
    for (int i = 0; i < 3; i++) {
        if (pp->secret[i]) {
            explicit_bzero(pp->secret[i], strlen(pp->secret[i]));
            free(pp->secret[i]);
        }
    }
    if (pp->p) {
        explicit_bzero(&pp->p->creds, sizeof pp->p->creds);
        /* The strings are ours, not VDDK's: detach them before FreeConnectParams. */
        pp->p->vmxSpec = pp->p->serverName = pp->p->thumbPrint = NULL;
        if (pp->from_vddk)
            vddk_g.fn.FreeConnectParams(pp->p);
        else
            free(pp->p);
    }
    free(pp->vmx);
    memset(pp, 0, sizeof *pp);
}

int vddk_params_build(vddk_params *pp, const vddk_conn *c, int with_vm, char *err)
{
    memset(pp, 0, sizeof *pp);
    if (!c->server) {
        if (c->vm_moref || c->snapshot_moref || c->user || c->password || c->cookie ||
            c->thumbprint || c->port || c->nfc_port)
            return vddk_fail(err, EINVAL, "vddk: connection fields are set but server is NULL "
                             "(a local connection takes none of them)");
    } else if ((with_vm && !c->vm_moref) || !c->user || !c->password) {
        return vddk_fail(err, EINVAL,
                         "vddk: connecting to %s needs vm_moref, user and password%s%s%s",
                         c->server, c->vm_moref || !with_vm ? "" : " (vm_moref missing)",
                         c->user ? "" : " (user missing)",
                         c->password ? "" : " (password missing)");
    }

    if (vddk_g.fn.AllocateConnectParams) {
        pp->p = vddk_g.fn.AllocateConnectParams();
        pp->from_vddk = pp->p != NULL;
    }
    if (!pp->p)
        pp->p = calloc(1, sizeof *pp->p);
    if (!pp->p)
        return vddk_fail(err, ENOMEM, "vddk: out of memory for connection parameters");
    if (!c->server)
        return 0;

    VixDiskLibConnectParams *p = pp->p;
    const char *vm = c->vm_moref;
    if (with_vm && (strncmp(vm, "moref=", 6) == 0 || strchr(vm, '?')))
        pp->vmx = strdup(vm);
    else if (with_vm && asprintf(&pp->vmx, "moref=%s", vm) < 0)
        pp->vmx = NULL;
    vddk_redact_add(c->user, 1);
    vddk_redact_add(c->password, 0);
    vddk_redact_add(c->cookie, 0);
    pp->secret[0] = strdup(c->user);
    pp->secret[1] = strdup(c->password);
    pp->secret[2] = c->cookie ? strdup(c->cookie) : NULL;
    if ((with_vm && !pp->vmx) || !pp->secret[0] || !pp->secret[1] ||
        (c->cookie && !pp->secret[2])) {
        vddk_params_free(pp);
        return vddk_fail(err, ENOMEM, "vddk: out of memory for connection parameters");
    }
    p->vmxSpec = pp->vmx;
    p->serverName = (char *)c->server;
    p->thumbPrint = (char *)c->thumbprint;
    p->port = c->port;
    p->nfcHostPort = c->nfc_port;
    p->specType = VIXDISKLIB_SPEC_VMX;
    if (c->cookie) {
        p->credType = VIXDISKLIB_CRED_SESSIONID;
        p->creds.sessionId.cookie = pp->secret[2];
        p->creds.sessionId.userName = pp->secret[0];
        p->creds.sessionId.key = pp->secret[1];
    } else {
        p->credType = VIXDISKLIB_CRED_UID;
        p->creds.uid.userName = pp->secret[0];
        p->creds.uid.password = pp->secret[1];
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* The job bracket: PrepareForAccess, Cleanup, EndAccess                                     */
/* ---------------------------------------------------------------------------------------- */

enum job_call { JOB_PREPARE, JOB_END, JOB_CLEANUP };

static int job_call(enum job_call which, const vddk_conn *c, const char *identity,
                    unsigned *cleaned, unsigned *remaining, char *err)
{
    static const char *const names[] = {"VixDiskLib_PrepareForAccess", "VixDiskLib_EndAccess",
                                        "VixDiskLib_Cleanup"};
    if (which != JOB_CLEANUP && (!identity || !identity[0] || strlen(identity) > 50))
        return vddk_fail(err, EINVAL, "%s: identity must be 1 to 50 characters", names[which]);

    pthread_mutex_lock(&vddk_g.lock);
    vddk_params pp;
    int rc = vddk_init_locked(c->libpath, c->config_file, err);
    if (rc == 0)
        rc = vddk_params_build(&pp, c, which != JOB_CLEANUP, err);
    if (rc == 0) {
        VixError e;
        uint32_t done = 0, left = 0;
        if (which == JOB_PREPARE)
            e = vddk_g.fn.PrepareForAccess(pp.p, identity);
        else if (which == JOB_END)
            e = vddk_g.fn.EndAccess(pp.p, identity);
        else
            e = vddk_g.fn.Cleanup(pp.p, &done, &left);
        vddk_params_free(&pp);
        if (e != VIX_OK)
            rc = vddk_vix_fail(err, e, "%s(server %s, vm %s)", names[which],
                               vddk_or_null(c->server), vddk_or_null(c->vm_moref));
        if (cleaned)
            *cleaned = done;
        if (remaining)
            *remaining = left;
    }
    pthread_mutex_unlock(&vddk_g.lock);
    return rc;
}

int vddk_prepare_access(const vddk_conn *c, const char *identity, char *err)
{
    return job_call(JOB_PREPARE, c, identity, NULL, NULL, err);
}

int vddk_end_access(const vddk_conn *c, const char *identity, char *err)
{
    return job_call(JOB_END, c, identity, NULL, NULL, err);
}

int vddk_cleanup(const vddk_conn *c, unsigned *cleaned_up, unsigned *remaining, char *err)
{
    return job_call(JOB_CLEANUP, c, NULL, cleaned_up, remaining, err);
}
