/*
 * vixDiskLibStub.h -- the VixDiskLib C ABI as the stand-in library exports it.
 *
 * Transcribed from /work/shared/reference/vsphere-vddk.md §1.2-1.4 (Linux x86-64) on its own,
 * deliberately not shared with native/vddk_internal.h: the stub is the tests' oracle for the
 * ABI, and a layout mistake copied into both sides would pass unnoticed.  The _Static_asserts
 * pin the offsets the reference gives.
 *
 * Build switches: STUB_VDDK6 builds a VDDK 6.5 look-alike (no QueryAllocatedBlocks,
 * FreeBlockList or AllocateConnectParams; VixDiskLibInfo without the two VDDK 7 sector-size
 * fields, 56 bytes); STUB_OMIT_READ leaves out VixDiskLib_Read and _ReadAsync (a broken
 * installation).
 */
#ifndef VIXDISKLIB_STUB_H
#define VIXDISKLIB_STUB_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef uint64_t VixError;
#define VIX_OK 0
#define VIX_ERROR_CODE(e) ((e) & 0xFFFF)

enum {
    VIX_E_FAIL = 1,
    VIX_E_OUT_OF_MEMORY = 2,
    VIX_E_INVALID_ARG = 3,
    VIX_E_FILE_NOT_FOUND = 4,
    VIX_E_OBJECT_IS_BUSY = 5,
    VIX_E_NOT_SUPPORTED = 6,
    VIX_E_FILE_ERROR = 7,
    VIX_E_FILE_READ_ONLY = 11,
    VIX_E_FILE_ACCESS_ERROR = 13,
    VIX_E_FILE_ALREADY_LOCKED = 15,
    VIX_E_AUTHENTICATION_FAIL = 35,
    VIX_E_INVALID_HANDLE = 1000,
    VIX_E_HOST_TCP_CONN_LOST = 14011,
    VIX_E_DISK_NOINIT = 16001,
    VIX_E_DISK_NOIO = 16002,
    VIX_E_DISK_OUTOFRANGE = 16007,
    VIX_E_DISK_KEY_NOTFOUND = 16052,
    VIX_E_DISK_INVALID_CONNECTION = 16054,
    VIX_E_DISK_INVALIDDISK = 16063,
    VIX_ASYNC = 25000,
};

typedef char Bool;
typedef uint64_t VixDiskLibSectorType;
#define VIXDISKLIB_SECTOR_SIZE 512
#define VIXDISKLIB_MIN_CHUNK_SIZE 128
#define VIXDISKLIB_MAX_CHUNK_NUMBER (512 * 1024)

#define VIXDISKLIB_FLAG_OPEN_UNBUFFERED 1
#define VIXDISKLIB_FLAG_OPEN_SINGLE_LINK 2
#define VIXDISKLIB_FLAG_OPEN_READ_ONLY 4
#define VIXDISKLIB_FLAG_OPEN_COMPRESSION_ZLIB 16
#define VIXDISKLIB_FLAG_OPEN_COMPRESSION_FASTLZ 32
#define VIXDISKLIB_FLAG_OPEN_COMPRESSION_SKIPZ 64

typedef void *VixDiskLibConnection;
typedef void *VixDiskLibHandle;
typedef void VixDiskLibGenericLogFunc(const char *fmt, va_list args);
typedef void (*VixDiskLibCompletionCB)(void *cbData, VixError result);
typedef Bool (VixDiskLibProgressFunc)(void *progressData, int percentCompleted);

typedef enum {
    VIXDISKLIB_CRED_UID = 1,
    VIXDISKLIB_CRED_SESSIONID = 2,
    VIXDISKLIB_CRED_TICKETID = 3,
    VIXDISKLIB_CRED_SSPI = 4,
    VIXDISKLIB_CRED_UNKNOWN = 256,
} VixDiskLibCredType;

typedef enum {
    VIXDISKLIB_SPEC_VMX = 0,
    VIXDISKLIB_SPEC_VSTORAGE_OBJECT = 1,
    VIXDISKLIB_SPEC_UNKNOWN = 2,
} VixDiskLibSpecType;

typedef enum {
    VIXDISKLIB_ADAPTER_IDE = 1,
    VIXDISKLIB_ADAPTER_SCSI_BUSLOGIC = 2,
    VIXDISKLIB_ADAPTER_SCSI_LSILOGIC = 3,
    VIXDISKLIB_ADAPTER_UNKNOWN = 256,
} VixDiskLibAdapterType;

typedef struct {
    char *userName;
    char *password;
} VixDiskLibUidPasswdCreds;

typedef struct {
    char *cookie;
    char *userName;
    char *key;
} VixDiskLibSessionIdCreds;

typedef struct {
    char *id;
    char *datastoreMoRef;
    char *ssId;
} VixDiskLibVStorageObjectSpec;

typedef struct {
    char *vmxSpec;
    char *serverName;
    char *thumbPrint;
    long reserved1;
    VixDiskLibCredType credType;
    union {
        VixDiskLibUidPasswdCreds uid;
        VixDiskLibSessionIdCreds sessionId;
        void *reserved2;
    } creds;
    uint32_t port;
    uint32_t nfcHostPort;
    char *reserved3;
    char reserved4[8];
    void *reserved5;
    union {
        VixDiskLibVStorageObjectSpec vStorageObjSpec;
    } spec;
    VixDiskLibSpecType specType;
} VixDiskLibConnectParams;

_Static_assert(sizeof(VixDiskLibConnectParams) == 128, "VixDiskLibConnectParams is 128 bytes");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved1) == 24, "reserved1 @24");
_Static_assert(offsetof(VixDiskLibConnectParams, credType) == 32, "credType @32");
_Static_assert(offsetof(VixDiskLibConnectParams, creds) == 40, "creds @40");
_Static_assert(offsetof(VixDiskLibConnectParams, port) == 64, "port @64");
_Static_assert(offsetof(VixDiskLibConnectParams, nfcHostPort) == 68, "nfcHostPort @68");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved3) == 72, "reserved3 @72");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved4) == 80, "reserved4 @80");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved5) == 88, "reserved5 @88");
_Static_assert(offsetof(VixDiskLibConnectParams, spec) == 96, "spec @96");
_Static_assert(offsetof(VixDiskLibConnectParams, specType) == 120, "specType @120");

typedef struct {
    uint32_t cylinders;
    uint32_t heads;
    uint32_t sectors;
} VixDiskLibGeometry;

typedef struct {
    VixDiskLibGeometry biosGeo;
    VixDiskLibGeometry physGeo;
    VixDiskLibSectorType capacity;
    VixDiskLibAdapterType adapterType;
    int numLinks;
    char *parentFileNameHint;
    char *uuid;
#ifndef STUB_VDDK6
    uint32_t logicalSectorSize;
    uint32_t physicalSectorSize;
#endif
} VixDiskLibInfo;

#ifdef STUB_VDDK6
_Static_assert(sizeof(VixDiskLibInfo) == 56, "VixDiskLibInfo is 56 bytes before VDDK 7");
#else
_Static_assert(sizeof(VixDiskLibInfo) == 64, "VixDiskLibInfo is 64 bytes from VDDK 7");
_Static_assert(offsetof(VixDiskLibInfo, logicalSectorSize) == 56, "logicalSectorSize @56");
#endif
_Static_assert(offsetof(VixDiskLibInfo, capacity) == 24, "capacity @24");
_Static_assert(offsetof(VixDiskLibInfo, parentFileNameHint) == 40, "parentFileNameHint @40");

typedef struct {
    VixDiskLibSectorType offset;
    VixDiskLibSectorType length;
} VixDiskLibBlock;

typedef struct {
    uint32_t numBlocks;
    VixDiskLibBlock blocks[1];
} VixDiskLibBlockList;

_Static_assert(offsetof(VixDiskLibBlockList, blocks) == 8, "blocks @8");

typedef struct {
    int diskType;
    VixDiskLibAdapterType adapterType;
    uint16_t hwVersion;
    VixDiskLibSectorType capacity;
    uint32_t logicalSectorSize;
    uint32_t physicalSectorSize;
} VixDiskLibCreateParams;

_Static_assert(sizeof(VixDiskLibCreateParams) == 32, "VixDiskLibCreateParams is 32 bytes");

#define STUB_EXPORT __attribute__((visibility("default")))

STUB_EXPORT VixError VixDiskLib_InitEx(uint32_t majorVersion, uint32_t minorVersion,
                                       VixDiskLibGenericLogFunc *log,
                                       VixDiskLibGenericLogFunc *warn,
                                       VixDiskLibGenericLogFunc *panic, const char *libDir,
                                       const char *configFile);
STUB_EXPORT void VixDiskLib_Exit(void);
STUB_EXPORT const char *VixDiskLib_ListTransportModes(void);
STUB_EXPORT VixError VixDiskLib_Cleanup(const VixDiskLibConnectParams *connectParams,
                                        uint32_t *numCleanedUp, uint32_t *numRemaining);
STUB_EXPORT VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *connectParams,
                                                 const char *identity);
STUB_EXPORT VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *connectParams,
                                          const char *identity);
STUB_EXPORT VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *connectParams,
                                          Bool readOnly, const char *snapshotRef,
                                          const char *transportModes,
                                          VixDiskLibConnection *connection);
STUB_EXPORT VixError VixDiskLib_Disconnect(VixDiskLibConnection connection);
STUB_EXPORT VixError VixDiskLib_Open(const VixDiskLibConnection connection, const char *path,
                                     uint32_t flags, VixDiskLibHandle *diskHandle);
STUB_EXPORT const char *VixDiskLib_GetTransportMode(VixDiskLibHandle diskHandle);
STUB_EXPORT VixError VixDiskLib_GetInfo(VixDiskLibHandle diskHandle, VixDiskLibInfo **info);
STUB_EXPORT void VixDiskLib_FreeInfo(VixDiskLibInfo *info);
STUB_EXPORT VixError VixDiskLib_Read(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                                     VixDiskLibSectorType numSectors, uint8_t *readBuffer);
STUB_EXPORT VixError VixDiskLib_Write(VixDiskLibHandle diskHandle,
                                      VixDiskLibSectorType startSector,
                                      VixDiskLibSectorType numSectors,
                                      const uint8_t *writeBuffer);
STUB_EXPORT VixError VixDiskLib_ReadAsync(VixDiskLibHandle diskHandle,
                                          VixDiskLibSectorType startSector,
                                          VixDiskLibSectorType numSectors, uint8_t *readBuffer,
                                          VixDiskLibCompletionCB callback, void *cbData);
STUB_EXPORT VixError VixDiskLib_WriteAsync(VixDiskLibHandle diskHandle,
                                           VixDiskLibSectorType startSector,
                                           VixDiskLibSectorType numSectors,
                                           const uint8_t *writeBuffer,
                                           VixDiskLibCompletionCB callback, void *cbData);
STUB_EXPORT VixError VixDiskLib_Flush(VixDiskLibHandle diskHandle);
STUB_EXPORT VixError VixDiskLib_Wait(VixDiskLibHandle diskHandle);
STUB_EXPORT VixError VixDiskLib_Close(VixDiskLibHandle diskHandle);
STUB_EXPORT char *VixDiskLib_GetErrorText(VixError err, const char *locale);
STUB_EXPORT void VixDiskLib_FreeErrorText(char *errMsg);
STUB_EXPORT VixError VixDiskLib_QueryAllocatedBlocks(VixDiskLibHandle diskHandle,
                                                     VixDiskLibSectorType startSector,
                                                     VixDiskLibSectorType numSectors,
                                                     VixDiskLibSectorType chunkSize,
                                                     VixDiskLibBlockList **blockList);
STUB_EXPORT VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *blockList);
STUB_EXPORT VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void);
STUB_EXPORT void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *connectParams);
STUB_EXPORT VixError VixDiskLib_Create(const VixDiskLibConnection connection, const char *path,
                                       const VixDiskLibCreateParams *createParams,
                                       VixDiskLibProgressFunc *progressFunc, void *progressData);
STUB_EXPORT VixError VixDiskLib_ReadMetadata(VixDiskLibHandle diskHandle, const char *key,
                                             char *buf, size_t bufLen, size_t *requiredLen);
STUB_EXPORT VixError VixDiskLib_WriteMetadata(VixDiskLibHandle diskHandle, const char *key,
                                              const char *val);
STUB_EXPORT VixError VixDiskLib_GetMetadataKeys(VixDiskLibHandle diskHandle, char *keys,
                                                size_t maxLen, size_t *requiredLen);

#endif /* VIXDISKLIB_STUB_H */
