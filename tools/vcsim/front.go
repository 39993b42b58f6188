package main

// The front HTTP handler, in front of the simulator's own mux.
//
// Why at the HTTP level: the simulator dispatches a SOAP method by looking up
// a Go method of that name on the target object (*simulator.VirtualMachine),
// and a program outside the package cannot add methods to that type. So a
// QueryChangedDiskAreas request is recognised here and answered by the shim,
// and everything else goes to the simulator unchanged, except:
//
//   - A handler panic is turned into a SOAP answer instead of a dropped
//     connection. This is the workaround for the third 0.24.2 bug:
//     PropertyCollector.Fetch (what pyvmomi uses to read one property, e.g.
//     vm.snapshot) indexes an empty MissingSet when the property is simply
//     unset, panics, and pyvmomi sees http.client.RemoteDisconnected. An
//     unset property is answered as vCenter does, with an empty
//     FetchResponse (pyvmomi returns None). Any other panic becomes a
//     vmodl.fault.SystemError carrying the panic message.
//   - /folder (datastore file access) requires a valid session cookie, as on
//     a real vCenter; the simulator itself serves it to anyone.

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

type frontHandler struct {
	inner      http.Handler
	shim       *cbtShim
	folderAuth bool
}

func newFrontHandler(inner http.Handler, shim *cbtShim, folderAuth bool) *frontHandler {
	return &frontHandler{inner: inner, shim: shim, folderAuth: folderAuth}
}

func (h *frontHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodPost && isSDKPath(r.URL.Path):
		h.serveSOAP(w, r)
	case strings.HasPrefix(r.URL.Path, "/folder/") && h.folderAuth && !h.authenticated(r):
		w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
		http.Error(w, "a valid vmware_soap_session cookie is required", http.StatusUnauthorized)
	default:
		h.inner.ServeHTTP(w, r)
	}
}

func isSDKPath(p string) bool {
	return p == simulator.Map.Path || p == simulator.Map.Path+"/vimService"
}

func (h *frontHandler) serveSOAP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	_ = r.Body.Close()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}

	// Cheap test first: only a body naming the method is decoded here.
	if bytes.Contains(body, []byte("QueryChangedDiskAreas")) {
		m, err := simulator.UnmarshalBody(types.TypeFunc(), body)
		if err == nil {
			if req, ok := m.Body.(*types.QueryChangedDiskAreas); ok {
				h.serveQueryChangedDiskAreas(w, r, req)
				return
			}
		}
	}

	// Everything else: the simulator, answering into a buffer so that a panic
	// in its handler can still be turned into a proper reply.
	r.Body = io.NopCloser(bytes.NewReader(body))
	rec := httptest.NewRecorder()
	if reason := callRecovering(h.inner, rec, r); reason != "" {
		if m, err := simulator.UnmarshalBody(types.TypeFunc(), body); err == nil && m.Name == "Fetch" {
			// The only known panic of Fetch is an unset property.
			writeSOAP(w, http.StatusOK, `<FetchResponse xmlns="urn:vim25"></FetchResponse>`)
			return
		}
		log.Printf("front: simulator panic answered as SystemError: %s", reason)
		writeFault(w, "vcsim: "+reason, &types.SystemError{Reason: reason})
		return
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

// callRecovering serves r with h and returns the panic message, if any.
func callRecovering(h http.Handler, w http.ResponseWriter, r *http.Request) (reason string) {
	defer func() {
		if p := recover(); p != nil {
			reason = fmt.Sprint(p)
		}
	}()
	h.ServeHTTP(w, r)
	return ""
}

func (h *frontHandler) serveQueryChangedDiskAreas(w http.ResponseWriter, r *http.Request, req *types.QueryChangedDiskAreas) {
	if !h.authenticated(r) {
		writeFault(w, "not authenticated", &types.NotAuthenticated{
			NoPermission: types.NoPermission{Object: req.This, PrivilegeId: "VirtualMachine.Provisioning.DiskRandomRead"},
		})
		return
	}
	info, fault := h.shim.queryChangedDiskAreas(req)
	if fault != nil {
		writeFault(w, faultString(fault), fault)
		return
	}
	var out bytes.Buffer
	res := types.QueryChangedDiskAreasResponse{Returnval: *info}
	if err := encodeElement(&out, "QueryChangedDiskAreasResponse", "", res); err != nil {
		writeFault(w, err.Error(), &types.SystemError{Reason: err.Error()})
		return
	}
	writeSOAP(w, http.StatusOK, out.String())
}

// authenticated tells whether the request carries the cookie of a live
// session. The simulator keeps its sessions private, so it is asked: a
// CurrentTime call (which needs a session and changes nothing) with the same
// cookies succeeds exactly when the session is valid.
func (h *frontHandler) authenticated(r *http.Request) bool {
	if _, err := r.Cookie("vmware_soap_session"); err != nil {
		return false
	}
	const probe = `<?xml version="1.0" encoding="UTF-8"?>` +
		`<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>` +
		`<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime>` +
		`</soapenv:Body></soapenv:Envelope>`
	req := httptest.NewRequest(http.MethodPost, simulator.Map.Path, strings.NewReader(probe))
	req.RemoteAddr = r.RemoteAddr
	req.Header.Set("Content-Type", "text/xml; charset=utf-8")
	req.Header.Set("User-Agent", r.UserAgent())
	for _, c := range r.Header.Values("Cookie") {
		req.Header.Add("Cookie", c)
	}
	rec := httptest.NewRecorder()
	if reason := callRecovering(h.inner, rec, req); reason != "" {
		return false
	}
	return rec.Code == http.StatusOK
}

const (
	nsSoapEnv = "http://schemas.xmlsoap.org/soap/envelope/"
	nsXSI     = "http://www.w3.org/2001/XMLSchema-instance"
)

// writeSOAP wraps a body element in a SOAP envelope.
func writeSOAP(w http.ResponseWriter, status int, inner string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?>`+
		`<soapenv:Envelope xmlns:soapenv="`+nsSoapEnv+`" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="`+nsXSI+`">`+
		`<soapenv:Body>`+inner+`</soapenv:Body></soapenv:Envelope>`)
}

// writeFault sends a SOAP fault the way vSphere does: the detail holds an
// element named after the fault type plus "Fault", with an xsi:type.
func writeFault(w http.ResponseWriter, msg string, fault types.BaseMethodFault) {
	name := faultTypeName(fault)
	var detail bytes.Buffer
	if err := encodeElement(&detail, name+"Fault", name, fault); err != nil {
		detail.Reset()
	}
	var esc bytes.Buffer
	_ = xml.EscapeText(&esc, []byte(msg))
	writeSOAP(w, http.StatusInternalServerError, `<soapenv:Fault><faultcode>ServerFaultCode</faultcode>`+
		`<faultstring>`+esc.String()+`</faultstring><detail>`+detail.String()+`</detail></soapenv:Fault>`)
}

// encodeElement writes v as an element in the vim25 namespace, with an
// xsi:type when xsiType is set.
func encodeElement(out *bytes.Buffer, name, xsiType string, v interface{}) error {
	start := xml.StartElement{Name: xml.Name{Local: name}, Attr: []xml.Attr{{Name: xml.Name{Local: "xmlns"}, Value: "urn:vim25"}}}
	if xsiType != "" {
		start.Attr = append(start.Attr,
			xml.Attr{Name: xml.Name{Local: "xmlns:xsi"}, Value: nsXSI},
			xml.Attr{Name: xml.Name{Local: "xsi:type"}, Value: xsiType})
	}
	enc := xml.NewEncoder(out)
	if err := enc.EncodeElement(v, start); err != nil {
		return err
	}
	return enc.Flush()
}

func faultTypeName(f types.BaseMethodFault) string {
	name := fmt.Sprintf("%T", f)
	return name[strings.LastIndex(name, ".")+1:]
}

func faultString(f types.BaseMethodFault) string {
	if msgs := f.GetMethodFault().FaultMessage; len(msgs) > 0 {
		return msgs[0].Message
	}
	return faultTypeName(f)
}
