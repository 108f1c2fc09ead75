"""Read mammogram DICOMs: decode pixel data of any archive transfer syntax into bright = dense arrays.

Also lists the populated identifying attributes of a header (the de-identification check) and says
in plain words what is wrong with a dataset's pixel data element. Writes nothing.

Decoding goes through pydicom 3's pixel backend (`pydicom.pixels.pixel_array`), which tries every
installed plugin for the file's transfer syntax in turn. With this project's dependencies every
syntax a mammography archive uses is covered:

=====================================  ==========================  ====================================
transfer syntax                        UID                         decoders (pydicom 3.0 plugin names)
=====================================  ==========================  ====================================
Implicit / Explicit VR Little Endian   1.2.840.10008.1.2, .1.2.1   pydicom (native)
Deflated Explicit VR Little Endian     1.2.840.10008.1.2.1.99      pydicom (native, zlib)
Explicit VR Big Endian (retired)       1.2.840.10008.1.2.2         pydicom (native)
JPEG Lossless (Process 14, and SV1)    1.2.840.10008.1.2.4.57/.70  pylibjpeg (pylibjpeg-libjpeg)
JPEG Baseline / Extended               1.2.840.10008.1.2.4.50/.51  pylibjpeg (libjpeg), pillow
JPEG-LS Lossless / Near-Lossless       1.2.840.10008.1.2.4.80/.81  pyjpegls, pylibjpeg (libjpeg)
JPEG 2000 Lossless / lossy             1.2.840.10008.1.2.4.90/.91  pylibjpeg (openjpeg), pillow
HTJ2K Lossless / lossy                 1.2.840.10008.1.2.4.201-3   pylibjpeg (openjpeg)
RLE Lossless                           1.2.840.10008.1.2.5         pydicom (native), pylibjpeg-rle
=====================================  ==========================  ====================================

Intensity pipeline (in DICOM's order, PS3.3 C.11): stored values -> Modality LUT (Rescale
Slope/Intercept or a Modality LUT Sequence) -> optionally the VOI LUT -> MONOCHROME1 inversion.

- The Modality LUT is always applied: it gives the detector's values, the same quantity for every
  image of a system. INbreast has none, so its values are the stored values.
- The VOI LUT (Window Center/Width or a VOI LUT Sequence) is a display choice; for segmentation we
  keep the modality values (`apply_voi=False`, params.yaml) because the per-image percentile
  normalisation that follows already adapts the contrast, and a narrow window would clip dense
  tissue and calcifications to one value. With `apply_voi=True` the first window (or LUT) is applied
  where the header has one and nothing is done where it has none.
- MONOCHROME1 (low = white) is inverted as `low + high - value`, with (low, high) the output range of
  the nominal stored range through the same LUTs, so bright always means dense. Any positive affine
  map is undone by the percentile normalisation, so only the sign matters downstream.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.tag import BaseTag, Tag

from mammoseg.errors import UserError

log = logging.getLogger(__name__)

# The attributes of DICOM PS3.15 Table E.1-1 (Basic Application Level Confidentiality Profile, 2024b)
# that must be absent or empty in a de-identified mammogram, by pydicom keyword: every attribute of
# the table that pydicom's dictionary knows, with the profile's actions X (remove), Z (empty), D
# (dummy value) and their combinations (X/Z, Z/D, X/D, X/Z/D). Z and D also allow a dummy value; INbreast
# has none, so a value is taken as real, and a site whose de-identifier writes dummies (e.g. a dummy
# ContentDate) allow-lists those attributes in params.yaml (validate.privacy_allowed). Left out:
# - action U (SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID,
#   MediaStorageSOPInstanceUID, ...) and X/Z/U* (ReferencedImageSequence, SourceImageSequence):
#   the profile replaces these UIDs instead of removing them, so every de-identified file has them;
# - the repeating groups Curve Data (50xx,xxxx), Overlay Data (60xx,3000) and Overlay Comments
#   (60xx,4000): pydicom has no keyword for them (tag_for_keyword returns None);
# - private attributes (the profile removes them): they are not inspected.
# The profile's other concern, text burned into the pixels, is BurnedInAnnotation (checked by validate).
IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    "AccessionNumber", "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDate",
    "AcquisitionDateTime", "AcquisitionDeviceProcessingDescription", "AcquisitionFieldOfViewLabel",
    "AcquisitionProtocolDescription", "AcquisitionTime", "ActualHumanPerformersSequence",
    "AdditionalPatientHistory", "AddressTrial", "AdmissionID", "AdmittingDate", "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription", "AdmittingTime", "AffectedSOPInstanceUID", "Allergies",
    "AnnotationGroupDescription", "AnnotationGroupLabel", "AnnotationGroupUID", "ApprovalStatusDateTime",
    "Arbitrary", "AssertionDateTime", "AssertionExpirationDateTime", "AttributeModificationDateTime",
    "AuthorObserverSequence", "BarcodeValue", "BeamDescription", "BeamHoldTransitionDateTime", "BolusDescription",
    "BranchOfService", "CalibrationDate", "CalibrationDateTime", "CalibrationTime", "CameraOwnerName", "CassetteID",
    "CertificateOfSigner", "CertifiedTimestamp", "ClinicalTrialCoordinatingCenterName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSeriesDescription",
    "ClinicalTrialSeriesID", "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSponsorName",
    "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointDescription",
    "ClinicalTrialTimePointID", "CommentsOnRadiationDose", "CommentsOnThePerformedProcedureStep",
    "CompensatorDescription", "ConceptualVolumeCombinationDescription", "ConceptualVolumeDescription",
    "ConfidentialityConstraintOnPatientDataDescription", "ConsultingPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "ContainerComponentID", "ContainerDescription", "ContainerIdentifier",
    "ContentCreatorIdentificationCodeSequence", "ContentCreatorName", "ContentDate", "ContentSequence",
    "ContentTime", "ContextGroupLocalVersion", "ContextGroupVersion", "ContrastBolusAgent",
    "ContrastBolusStartTime", "ContrastBolusStopTime", "ContributionDateTime", "ContributionDescription",
    "CountryOfResidence", "CreationDate", "CreationTime", "CurrentObserverTrial", "CurrentPatientLocation",
    "CurveDate", "CurveTime", "CustodialOrganizationSequence", "DataSetTrailingPadding", "Date",
    "DateOfDocumentOrVerbalTransactionTrial", "DateOfInstallation", "DateOfLastCalibration",
    "DateOfLastDetectorCalibration", "DateOfManufacture", "DateOfSecondaryCapture", "DateTime",
    "DateTimeOfLastCalibration", "DecayCorrectionDateTime", "DecompositionDescription", "DerivationDescription",
    "DestinationAE", "DetectorID", "DeviceAlternateIdentifier", "DeviceDescription", "DeviceLabel",
    "DeviceSerialNumber", "DeviceSettingDescription", "DigitalSignatureDateTime", "DigitalSignaturesSequence",
    "DischargeDate", "DischargeDiagnosisDescription", "DischargeTime", "DisplacementReferenceLabel",
    "DistributionAddress", "DistributionName", "DoseReferenceDescription", "EffectiveDateTime",
    "EncapsulatedDocument", "EndAcquisitionDateTime", "EntityDescription", "EntityLabel", "EntityLongLabel",
    "EntityName", "EquipmentFrameOfReferenceDescription", "EthicsCommitteeApprovalEffectivenessEndDate",
    "EthicsCommitteeApprovalEffectivenessStartDate", "EthnicGroup", "ExclusionStartDateTime",
    "ExpectedCompletionDateTime", "FillerOrderNumberImagingServiceRequest", "FilterLookupTableDescription",
    "FindingsGroupRecordingDateTrial", "FindingsGroupRecordingTimeTrial", "FirstTreatmentDate",
    "FixationDeviceDescription", "FlowIdentifier", "FlowIdentifierSequence", "FractionGroupDescription",
    "FractionationNotes", "FrameAcquisitionDateTime", "FrameComments", "FrameOriginTimestamp",
    "FrameReferenceDateTime", "FunctionalSyncPulse", "GPSAltitude", "GPSAltitudeRef", "GPSAreaInformation",
    "GPSDOP", "GPSDateStamp", "GPSDestBearing", "GPSDestBearingRef", "GPSDestDistance", "GPSDestDistanceRef",
    "GPSDestLatitude", "GPSDestLatitudeRef", "GPSDestLongitude", "GPSDestLongitudeRef", "GPSDifferential",
    "GPSImgDirection", "GPSImgDirectionRef", "GPSLatitude", "GPSLatitudeRef", "GPSLongitude", "GPSLongitudeRef",
    "GPSMapDatum", "GPSMeasureMode", "GPSProcessingMethod", "GPSSatellites", "GPSSpeed", "GPSSpeedRef", "GPSStatus",
    "GPSTimeStamp", "GPSTrack", "GPSTrackRef", "GPSVersionID", "GantryID", "GeneratorID",
    "GraphicAnnotationSequence", "HL7DocumentEffectiveTime", "HangingProtocolCreationDateTime",
    "HumanPerformerName", "HumanPerformerOrganization", "IconImageSequence", "IdentifyingComments", "ImageComments",
    "ImagePresentationComments", "ImagingServiceRequestComments", "ImpedanceMeasurementDateTime", "Impressions",
    "InformationIssueDateTime", "InstanceCoercionDateTime", "InstanceCreationDate", "InstanceCreationTime",
    "InstanceOriginStatus", "InstitutionAddress", "InstitutionCodeSequence", "InstitutionName",
    "InstitutionalDepartmentName", "InstitutionalDepartmentTypeCodeSequence", "InstructionPerformedDateTime",
    "InsurancePlanIdentification", "IntendedFractionStartTime", "IntendedPhaseEndDate", "IntendedPhaseStartDate",
    "IntendedRecipientsOfResultsIdentificationSequence", "InterlockDateTime", "InterlockDescription",
    "InterlockOriginDescription", "InterpretationApprovalDate", "InterpretationApprovalTime",
    "InterpretationApproverSequence", "InterpretationAuthor", "InterpretationDiagnosisDescription",
    "InterpretationID", "InterpretationIDIssuer", "InterpretationRecordedDate", "InterpretationRecordedTime",
    "InterpretationRecorder", "InterpretationText", "InterpretationTranscriber", "InterpretationTranscriptionDate",
    "InterpretationTranscriptionTime", "InterventionDrugStartTime", "InterventionDrugStopTime",
    "IssueDateOfImagingServiceRequest", "IssueTimeOfImagingServiceRequest", "IssuerOfAdmissionID",
    "IssuerOfAdmissionIDSequence", "IssuerOfClinicalTrialProtocolID", "IssuerOfClinicalTrialSeriesID",
    "IssuerOfClinicalTrialSiteID", "IssuerOfClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialTimePointID", "IssuerOfPatientID", "IssuerOfServiceEpisodeID",
    "IssuerOfServiceEpisodeIDSequence", "IssuerOfTheContainerIdentifierSequence",
    "IssuerOfTheSpecimenIdentifierSequence", "LabelText", "LastMenstrualDate", "LensMake", "LensModel",
    "LensSerialNumber", "LensSpecification", "LongDeviceDescription", "MAC", "MakerNote",
    "ManufacturerDeviceIdentifier", "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank",
    "ModifiedAttributesSequence", "ModifiedImageDate", "ModifiedImageDescription", "ModifiedImageTime",
    "ModifyingDeviceID", "ModifyingSystem", "MostRecentTreatmentDate", "MultienergyAcquisitionDescription",
    "NameOfPhysiciansReadingStudy", "NamesOfIntendedRecipientsOfResults", "NetworkID",
    "NonconformingDataElementValue", "NonconformingModifiedAttributesSequence", "ObservationDateTime",
    "ObservationDateTrial", "ObservationStartDateTime", "ObservationTimeTrial", "Occupation",
    "OperatorIdentificationSequence", "OperatorsName", "OrderCallbackPhoneNumber",
    "OrderCallbackTelecomInformation", "OrderEnteredBy", "OrderEntererLocation", "OriginalAttributesSequence",
    "Originator", "OtherClinicalTrialProtocolIDsSequence", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "OverlayDate", "OverlayTime", "OverrideDateTime", "ParticipantSequence",
    "ParticipationDateTime", "PatientAddress", "PatientAge", "PatientBirthDate", "PatientBirthName",
    "PatientBirthTime", "PatientComments", "PatientID", "PatientInstitutionResidence",
    "PatientInsurancePlanCodeSequence", "PatientMotherBirthName", "PatientName",
    "PatientPrimaryLanguageCodeSequence", "PatientPrimaryLanguageModifierCodeSequence",
    "PatientReligiousPreference", "PatientSetupPhotoDescription", "PatientSex", "PatientSexNeutered", "PatientSize",
    "PatientState", "PatientTelecomInformation", "PatientTelephoneNumbers", "PatientTransportArrangements",
    "PatientTreatmentPreparationMethodDescription", "PatientTreatmentPreparationProcedureParameterDescription",
    "PatientWeight", "PerformedLocation", "PerformedProcedureStepDescription", "PerformedProcedureStepEndDate",
    "PerformedProcedureStepEndDateTime", "PerformedProcedureStepEndTime", "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartDateTime", "PerformedProcedureStepStartTime",
    "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence", "PerformedStationName",
    "PerformedStationNameCodeSequence", "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName",
    "PersonAddress", "PersonIdentificationCodeSequence", "PersonName", "PersonTelecomInformation",
    "PersonTelephoneNumbers", "PhysicianApprovingInterpretation", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "PlacerOrderNumberImagingServiceRequest", "PlateID", "PositionAcquisitionTemplateDescription",
    "PositionAcquisitionTemplateName", "PreMedication", "PregnancyStatus", "PrescriptionDescription",
    "PrescriptionNotes", "PrescriptionNotesSequence", "PresentationCreationDate", "PresentationCreationTime",
    "PriorTreatmentDoseDescription", "ProcedureStepCancellationDateTime", "ProductExpirationDateTime",
    "ProtocolName", "PyramidDescription", "PyramidLabel", "ROICreatorSequence", "ROIDateTime", "ROIDescription",
    "ROIGenerationDescription", "ROIInterpreter", "ROIInterpreterSequence", "ROIName", "ROIObservationDateTime",
    "ROIObservationDescription", "ROIObservationLabel", "RTAccessoryDeviceSlotID", "RTAccessoryHolderSlotID",
    "RTPhysicianIntentNarrative", "RTPlanDate", "RTPlanDescription", "RTPlanLabel", "RTPlanName", "RTPlanTime",
    "RTPrescriptionLabel", "RTToleranceSetLabel", "RTTreatmentApproachLabel", "RadiationDoseIdentificationLabel",
    "RadiationDoseInVivoMeasurementLabel", "RadiationGenerationModeDescription", "RadiationGenerationModeLabel",
    "RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime", "RadiopharmaceuticalStopDateTime",
    "RadiopharmaceuticalStopTime", "ReasonForOmissionDescription", "ReasonForRequestedProcedureCodeSequence",
    "ReasonForStudy", "ReasonForSuperseding", "ReasonForTheAttributeModification",
    "ReasonForTheImagingServiceRequest", "ReasonForTheRequestedProcedure", "ReasonForVisit",
    "ReasonForVisitCodeSequence", "ReceivingAE", "RecordedRTControlPointDateTime", "ReferencedDateTime",
    "ReferencedDigitalSignatureSequence", "ReferencedPatientAliasSequence", "ReferencedPatientPhotoSequence",
    "ReferencedPatientSequence", "ReferencedPerformedProcedureStepSequence", "ReferencedSOPInstanceMACSequence",
    "ReferencedStudySequence", "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianName", "ReferringPhysicianTelephoneNumbers", "RegionOfResidence",
    "RequestAttributesSequence", "RequestedContrastAgent", "RequestedProcedureComments",
    "RequestedProcedureDescription", "RequestedProcedureID", "RequestedProcedureLocation",
    "RequestedSeriesDescription", "RequestingAE", "RequestingPhysician", "RequestingService",
    "RespiratoryMotionCompensationTechniqueDescription", "ResponsibleOrganization", "ResponsiblePerson",
    "ResultsComments", "ResultsDistributionListSequence", "ResultsID", "ResultsIDIssuer", "RetrieveAETitle",
    "ReviewDate", "ReviewTime", "ReviewerName", "SOPAuthorizationDateTime", "SafePositionExitDate",
    "SafePositionExitTime", "SafePositionReturnDate", "SafePositionReturnTime", "ScheduledAdmissionDate",
    "ScheduledAdmissionTime", "ScheduledDischargeDate", "ScheduledDischargeTime",
    "ScheduledHumanPerformersSequence", "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription", "ScheduledProcedureStepEndDate", "ScheduledProcedureStepEndTime",
    "ScheduledProcedureStepExpirationDateTime", "ScheduledProcedureStepID", "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepModificationDateTime", "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartDateTime", "ScheduledProcedureStepStartTime", "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName", "ScheduledStationNameCodeSequence",
    "ScheduledStudyLocation", "ScheduledStudyLocationAETitle", "ScheduledStudyStartDate", "ScheduledStudyStartTime",
    "ScheduledStudyStopDate", "ScheduledStudyStopTime", "SelectorAEValue", "SelectorASValue", "SelectorDAValue",
    "SelectorDTValue", "SelectorLOValue", "SelectorLTValue", "SelectorOBValue", "SelectorPNValue",
    "SelectorSHValue", "SelectorSTValue", "SelectorTMValue", "SelectorUNValue", "SelectorURValue",
    "SelectorUTValue", "SeriesDate", "SeriesDescription", "SeriesTime", "ServiceEpisodeDescription",
    "ServiceEpisodeID", "SetupTechniqueDescription", "ShieldingDeviceDescription", "SlideIdentifier",
    "SmokingStatus", "SourceEndDateTime", "SourceIdentifier", "SourceManufacturer", "SourceOfPreviousValues",
    "SourceSerialNumber", "SourceStartDateTime", "SourceStrengthReferenceDate", "SourceStrengthReferenceTime",
    "SpecialNeeds", "SpecimenAccessionNumber", "SpecimenDetailedDescription", "SpecimenIdentifier",
    "SpecimenPreparationSequence", "SpecimenShortDescription", "StartAcquisitionDateTime", "StationAETitle",
    "StationName", "StructureSetDate", "StructureSetDescription", "StructureSetLabel", "StructureSetName",
    "StructureSetTime", "StudyArrivalDate", "StudyArrivalTime", "StudyComments", "StudyCompletionDate",
    "StudyCompletionTime", "StudyDate", "StudyDescription", "StudyID", "StudyIDIssuer", "StudyReadDate",
    "StudyReadTime", "StudyTime", "StudyVerifiedDate", "StudyVerifiedTime", "SubstanceAdministrationDateTime",
    "TelephoneNumberTrial", "TemplateLocalVersion", "TemplateVersion", "TextComments", "TextString", "Time",
    "TimeOfDocumentCreationOrVerbalTransactionTrial", "TimeOfLastCalibration", "TimeOfLastDetectorCalibration",
    "TimeOfSecondaryCapture", "TimezoneOffsetFromUTC", "TopicAuthor", "TopicKeywords", "TopicSubject", "TopicTitle",
    "TransducerIdentificationSequence", "TreatmentControlPointDate", "TreatmentControlPointTime", "TreatmentDate",
    "TreatmentMachineName", "TreatmentPositionGroupLabel", "TreatmentSite", "TreatmentSites",
    "TreatmentTechniqueNotes", "TreatmentTime", "TreatmentToleranceViolationDateTime",
    "TreatmentToleranceViolationDescription", "UDISequence", "UniqueDeviceIdentifier", "UserContentLabel",
    "UserContentLongLabel", "VerbalSourceIdentifierCodeSequenceTrial", "VerbalSourceTrial", "VerificationDateTime",
    "VerifyingObserverIdentificationCodeSequence", "VerifyingObserverName", "VerifyingObserverSequence",
    "VerifyingOrganization", "VisitComments", "WaveformFilterDescription", "XRayDetectorID", "XRayDetectorLabel",
    "XRaySourceID",
)

# Each keyword's tag, looked up once: `tag in ds` is a dict lookup, a keyword needs a dictionary search.
_IDENTIFYING_TAGS: tuple[tuple[str, BaseTag], ...] = tuple((keyword, Tag(keyword)) for keyword in IDENTIFYING_KEYWORDS)
_PIXEL_DATA = Tag("PixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF  # encapsulated pixel data: the length is not written in the header

# Read with the pixels besides group 0028 (which pixel_array always returns): the laterality tags.
_EXTRA_TAGS = (Tag("ImageLaterality"), Tag("Laterality"))


@dataclasses.dataclass(frozen=True)
class DicomImage:
    """A decoded single-frame grayscale image, bright = dense.

    Attributes:
        pixels: (rows, columns) float32 modality values (or VOI output when `intensity` is "voi"),
            inverted for MONOCHROME1.
        photometric: the header's PhotometricInterpretation (MONOCHROME1 or MONOCHROME2).
        transfer_syntax: name of the transfer syntax the pixel data was stored in.
        intensity: "modality" or "voi": which LUT stage the values come from.
        inverted: whether MONOCHROME1 inversion was applied.
        laterality: "L" or "R" from ImageLaterality (or Laterality), None where the header has neither.
    """

    pixels: np.ndarray
    photometric: str
    transfer_syntax: str
    intensity: str
    inverted: bool
    laterality: str | None

    @property
    def shape(self) -> tuple[int, int]:
        """Return (rows, columns)."""
        return self.pixels.shape  # type: ignore[return-value]


def _one_line(exc: BaseException) -> str:
    """Return an exception as `Type: message` on one line, shortened for a one-line error.

    pydicom lists each plugin's failure on a line of its own; they are joined, not dropped.
    """
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _transfer_syntax_name(ds: Dataset) -> str:
    """Return the name of the dataset's transfer syntax, or 'unknown transfer syntax'."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid is not None else "unknown transfer syntax"


def _syntax_of_file(path: Path) -> str:
    """Return the transfer syntax name from a file's header, for error messages; never raises."""
    try:
        return _transfer_syntax_name(pydicom.dcmread(path, stop_before_pixels=True))
    except Exception:  # the header itself is unreadable: say so instead of failing differently
        return "not a readable DICOM header"


def laterality_of(ds: Dataset) -> str | None:
    """Return "L" or "R" from ImageLaterality, else Laterality; None where neither says L or R."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def _stored_range(ds: Dataset) -> np.ndarray:
    """Return the nominal [min, max] stored value, shape (2,), from BitsStored and PixelRepresentation."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    return np.array([0, 2**bits - 1], dtype=np.int64)


def _modality(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the Modality LUT; rescale in float32 (pydicom's own path goes through float64)."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _has_voi(ds: Dataset) -> bool:
    """Tell whether the header carries a VOI window or VOI LUT."""
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def read_image(path: str | PathLike[str], *, apply_voi: bool) -> DicomImage:
    """Decode a single-frame grayscale DICOM into bright = dense float32 values.

    Args:
        path: the DICOM file.
        apply_voi: apply the header's first VOI window / VOI LUT when it has one (see the module
            docstring); False keeps the modality values.

    Returns:
        The decoded image and what was done to it.

    Raises:
        UserError: the file is not DICOM, has no or undecodable pixel data (no installed decoder, a
            corrupt stream), or is not a single-frame grayscale image.
    """
    path = Path(path)
    ds = Dataset()
    try:
        # pixel_array(path) reads the file once and fills ds with the file meta, the image pixel
        # module (group 0028: LUTs, windows, photometric) and the tags asked for.
        arr = pixel_array(path, ds_out=ds, specific_tags=list(_EXTRA_TAGS))
    except FileNotFoundError:
        raise UserError(f"{path}: DICOM file not found") from None
    except Exception as exc:  # pydicom and its plugins raise many types; all mean "cannot decode"
        raise UserError(f"{path}: cannot decode pixel data ({_syntax_of_file(path)}; {_one_line(exc)})") \
            from None
    syntax = _transfer_syntax_name(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1 or arr.ndim != 2:
        raise UserError(f"{path}: expected one 2D grayscale frame, got pixel array of shape {arr.shape} "
                        f"({frames} frame(s); tomosynthesis or colour is not supported)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UserError(f"{path}: PhotometricInterpretation {photometric or '(missing)'!r} is not "
                        "MONOCHROME1 or MONOCHROME2")
    try:
        pixels = _modality(arr, ds)
        value_range = _modality(_stored_range(ds), ds)
        intensity = "modality"
        if apply_voi and _has_voi(ds):
            pixels = apply_voi_lut(pixels, ds, index=0).astype(np.float32)
            value_range = apply_voi_lut(value_range, ds, index=0).astype(np.float32)
            intensity = "voi"
    except Exception as exc:  # a malformed LUT or window in the header
        raise UserError(f"{path}: cannot apply the Modality/VOI LUT ({_one_line(exc)})") from None
    inverted = photometric == "MONOCHROME1"
    if inverted:
        low, high = float(value_range.min()), float(value_range.max())
        pixels = np.float32(low + high) - pixels
    return DicomImage(np.ascontiguousarray(pixels, dtype=np.float32), photometric, syntax, intensity,
                      inverted, laterality_of(ds))


def identifying_attributes(source: str | PathLike[str] | Dataset, *,
                           allowed: Collection[str] = ()) -> dict[str, str]:
    """List the populated identifying attributes of a DICOM header (the de-identification check).

    Args:
        source: a DICOM file (only the header is read) or an already read dataset.
        allowed: keywords of IDENTIFYING_KEYWORDS that may keep a value (a documented exception,
            e.g. PatientSex in a mammography dataset); they are not listed.

    Returns:
        keyword -> value as text, for each keyword of IDENTIFYING_KEYWORDS (less `allowed`) present
        with a non-empty value, in that list's order; an empty dict means the header passes.

    Raises:
        UserError: the file cannot be read as DICOM.
    """
    if isinstance(source, Dataset):
        ds = source
    else:
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True)
        except FileNotFoundError:
            raise UserError(f"{source}: DICOM file not found") from None
        except Exception as exc:  # any parse failure means "not readable DICOM"
            raise UserError(f"{source}: not a readable DICOM file ({_one_line(exc)})") from None
    skip = frozenset(allowed)
    found: dict[str, str] = {}
    for keyword, tag in _IDENTIFYING_TAGS:
        if tag not in ds or keyword in skip:
            continue
        value = ds[tag].value
        if value is None or (hasattr(value, "__len__") and len(value) == 0):
            continue
        text = str(value).strip()
        if text:
            found[keyword] = text
    return found


# How ingest and validate name a file pydicom refuses to open as DICOM (one wording in both reports).
NOT_DICOM = "not a DICOM file (no 'DICM' prefix or file meta header)"


def missing_from_header(ds: Dataset, keywords: Sequence[str]) -> str | None:
    """Say which of `keywords` are absent or empty in `ds` ("Rows and Columns missing from the header").

    Args:
        ds: a DICOM dataset.
        keywords: attribute keywords the caller needs.

    Returns:
        The one-line problem, or None when every keyword has a value.
    """
    missing = [keyword for keyword in keywords if ds.get(keyword) in (None, "")]
    return f"{' and '.join(missing)} missing from the header" if missing else None


def pixel_data_problem(ds: Dataset) -> str | None:
    """Say in plain words why a dataset's pixel data cannot hold its image; None when nothing is wrong.

    Catches before decoding what the decoders report obscurely (a TypeError for empty pixel data, a
    byte count for a cut file): PixelData missing or empty, PixelData shorter than the length its
    header declares (a truncated file) and, for native (not encapsulated) transfer syntaxes, a length
    that disagrees with Rows x Columns x frames x samples x BitsAllocated. Call it before anything
    reads PixelData: the declared length is known only while the element is still raw.

    Args:
        ds: a dataset read with its pixel data.
    """
    element = ds.get_item(_PIXEL_DATA)
    if element is None:
        return "no pixel data (PixelData is missing; the file may be truncated)"
    value = element.value
    if value is None or len(value) == 0:
        return "no pixel data (PixelData is empty)"
    declared = getattr(element, "length", None)  # a RawDataElement keeps the header's length
    if declared is not None and declared != _UNDEFINED_LENGTH and declared > len(value):
        return f"truncated file (PixelData has {len(value)} of its {declared} bytes)"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_encapsulated:
        return None  # compressed frames: only the decoder knows how long they should be
    missing = missing_from_header(ds, ("Rows", "Columns", "BitsAllocated"))
    if missing:
        return missing
    rows, columns, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    expected = (rows * columns * frames * samples * bits + 7) // 8
    if len(value) not in (expected, expected + expected % 2):  # an odd length is padded to even
        shape = f"{rows}x{columns}" + (f"x{frames} frames" if frames != 1 else "")
        return (f"Rows/Columns disagree with the pixel data: {shape} at {bits} bits needs {expected} "
                f"bytes, PixelData has {len(value)}")
    return None
