// Command vcsim is blockvault's launcher for govmomi's vCenter simulator.
//
// Why it exists: Debian ships govmomi (0.24.2) as a Go library only, without
// the upstream vcsim program, and that version lacks what a backup engine's
// tests need most: Changed Block Tracking. This launcher builds the default
// VPX inventory with the library, then adds (see cbt.go and front.go):
//
//   - changeIds on the disks of snapshots taken while CBT is on, and
//     QueryChangedDiskAreas answered from the disks' flat files as they were
//     when each snapshot was taken, in bounded windows;
//   - workarounds for three 0.24.2 bugs that break ordinary pyvmomi code
//     (capability.changeTrackingSupported unset, task entities that are
//     snapshots, and the Fetch handler panicking on unset properties);
//   - session checks on the /folder datastore file access, as on a real
//     vCenter, so that clients which forget the session cookie fail here too.
//
// Like upstream vcsim, `-l 127.0.0.1:0` picks a free port and prints one line
// on stdout:
//
//	export GOVC_URL=https://user:pass@127.0.0.1:PORT/sdk GOVC_SIM_PID=PID
//
// SIGTERM or SIGINT stops it and deletes the datastore temp directories
// (created under $TMPDIR).
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:8989", "listen address (host:port; port 0 picks a free port)")
	username := flag.String("username", "", "accept only this user name (default: any non-empty user and password)")
	password := flag.String("password", "", "accept only this password (with -username)")
	vms := flag.Int("vm", 2, "virtual machines per host and per resource pool in the default inventory")
	windowBytes := flag.Int64("cbt-window-bytes", defaultWindowBytes,
		"QueryChangedDiskAreas: at most this many bytes of the disk covered by one reply (a multiple of 65536)")
	windowExtents := flag.Int("cbt-window-extents", defaultWindowExtents,
		"QueryChangedDiskAreas: at most this many extents in one reply")
	folderAuth := flag.Bool("folder-auth", true,
		"require a valid session cookie for /folder datastore file access, as a real vCenter does")
	flag.BoolVar(&growFlatFiles, "grow-flat-files", true,
		"keep every disk's -flat.vmdk as long as the disk's capacity (false: as short as what was written, "+
			"like a thin disk on a datastore that stores it short)")
	exitWithParent := flag.Bool("exit-with-parent", false,
		"stop (and clean up) when the parent process goes away, e.g. a test runner that was killed")
	flag.Parse()

	if *windowBytes <= 0 || *windowBytes%blockSize != 0 {
		log.Fatalf("vcsim: -cbt-window-bytes must be a positive multiple of %d", blockSize)
	}
	if *windowExtents <= 0 {
		log.Fatalf("vcsim: -cbt-window-extents must be positive")
	}
	if (*username == "") != (*password == "") {
		log.Fatalf("vcsim: give both -username and -password, or neither")
	}

	model := simulator.VPX()
	model.Machine = *vms
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: creating the inventory: %v", err)
	}

	// The model's datastores are temp directories; remember them now, so
	// that only they are removed at exit (see removeDirs).
	dirs := datastoreDirs()

	// Model.Create replaces simulator.Map, so the shim must hook the
	// registry only now; it also fixes up the VMs the model already made.
	shim := newCBTShim(*windowBytes, *windowExtents)
	shim.install()

	model.Service.TLS = new(tls.Config) // self-signed certificate, as upstream vcsim
	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		// Left nil, the simulator accepts any non-empty credentials.
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}

	server := model.Service.NewServer()

	// NewServer has already started serving its own mux; the front handler
	// (QueryChangedDiskAreas, the Fetch fix, /folder session checks) is put in
	// front of it before the URL is printed, i.e. before any client can know
	// the port when it was chosen by the kernel. With a fixed port a client
	// polling the port could in theory slip in between; it would just see
	// plain vcsim for that one request.
	server.Config.Handler = newFrontHandler(server.Config.Handler, shim, *folderAuth)

	fmt.Printf("export GOVC_URL=%s GOVC_SIM_PID=%d\n", server.URL, os.Getpid())

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	if *exitWithParent {
		go watchParent(stop)
	}
	<-stop

	// Do not wait for in-flight requests (a WaitForUpdates long poll would
	// delay the exit): close the listener, remove the datastore directories
	// and leave. Model.Remove is not used: it iterates the registry without
	// its lock, racing with requests still in flight; and all it adds to the
	// directory removal is stopping Docker containers, which this launcher
	// never starts (no Docker on the test machines).
	_ = server.Listener.Close()
	removeDirs(dirs)
	os.Exit(0)
}

// datastoreDirs lists the local directories of the inventory's datastores.
func datastoreDirs() []string {
	var dirs []string
	for _, e := range simulator.Map.All("Datastore") {
		if ds, ok := e.(*simulator.Datastore); ok {
			dirs = append(dirs, ds.Info.GetDatastoreInfo().Url)
		}
	}
	return dirs
}

// removeDirs deletes the model's datastore directories; as a guard, only
// directories named like the simulator's temp directories.
func removeDirs(dirs []string) {
	for _, dir := range dirs {
		if strings.HasPrefix(filepath.Base(dir), "govcsim-") {
			if err := os.RemoveAll(dir); err != nil {
				log.Printf("vcsim: removing %s: %v", dir, err)
			}
		}
	}
}

// watchParent signals stop once this process is re-parented, which happens
// when the process that started it has died (even by SIGKILL, where it had no
// chance to stop us).
func watchParent(stop chan<- os.Signal) {
	parent := os.Getppid()
	for range time.Tick(500 * time.Millisecond) {
		if os.Getppid() != parent {
			stop <- syscall.SIGTERM
			return
		}
	}
}
